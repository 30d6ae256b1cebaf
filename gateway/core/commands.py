"""The reserved SSH commands (`run:detached`, `run:list`, ...): parsing and help.

A word with a colon cannot be a Procfile process type, so these never clash with an
app's own commands. OpenSSH's client joins its arguments with spaces and sends one
string, so a command's own quoting is gone by the time it arrives: options are read off
the front of the string word by word, and what follows is the command text, untouched,
with one exception: a command text that is exactly one quoted word (`run:detached 'echo
a; echo b'`, as a heroku command is written) is unquoted, since as one word it could
only name a program called `echo a; echo b`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from gateway.core.names import InvalidName, check_config_key, parse_dyno_name
from gateway.core.protocol import DynoInfo

HELP = """\
Reserved commands (a colon keeps them apart from your Procfile's process types):

  run [--size S] [-e K=V]... [--] CMD      run CMD attached, with options
  run:detached [--size S] [-e K=V]... CMD  start CMD in a new dyno and return at once;
                                           its output goes to the app log
  run:list [--json]                        the app's running one-off dynos
  run:stop run.N                           stop a dyno: SIGTERM, a grace period, SIGKILL
  run:logs [-p run.N] [-n N] [--tail]      the app log; --tail follows it
  run:help                                 this text

Examples:
  ssh APP@HOST run:detached 'rake jobs:work'
  ssh APP@HOST run --size standard-2x -e RAILS_ENV=staging -- rails runner 'p 1'
  ssh APP@HOST run:logs -p run.3 --tail
"""


class UsageError(ValueError):
    """A reserved command used wrongly; the message says how to use it."""


@dataclass(frozen=True)
class Run:
    command: str
    attach: bool
    size: str | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RunList:
    json: bool = False


@dataclass(frozen=True)
class RunStop:
    dyno: str


@dataclass(frozen=True)
class RunLogs:
    dyno: str | None = None
    lines: int = 100
    tail: bool = False


@dataclass(frozen=True)
class RunHelp:
    pass


Reserved = Run | RunList | RunStop | RunLogs | RunHelp


def _words(text: str) -> list[tuple[str, int]]:
    """Whitespace-separated words with simple quoting ('a b', "a b"), each with the
    offset just past it, so the rest of the text can be taken as it is."""
    words, i = [], 0
    while i < len(text):
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            break
        word = []
        while i < len(text) and not text[i].isspace():
            if text[i] in "'\"":
                quote = text[i]
                end = text.find(quote, i + 1)
                if end < 0:
                    raise UsageError(f"unmatched {quote} in the options")
                word.append(text[i + 1 : end])
                i = end + 1
            else:
                word.append(text[i])
                i += 1
        words.append(("".join(word), i))
    return words


def parse(command: str) -> Reserved | None:
    """The reserved command `command` names, or None when it is an app command."""
    stripped = command.strip()
    name, _, rest = stripped.partition(" ")
    if not name.startswith("run:") and name != "run":
        return None
    if name == "run" and not rest.strip():
        return None  # a plain `run` could be the app's own program
    if name in ("run", "run:detached"):
        return _parse_run(rest, attach=name == "run")
    if name == "run:list":
        options = [word for word, _ in _words(rest)]
        if options not in ([], ["--json"]):
            raise UsageError("usage: run:list [--json]")
        return RunList(json=bool(options))
    if name == "run:stop":
        options = [word for word, _ in _words(rest)]
        if len(options) != 1 or parse_dyno_name(options[0]) is None:
            raise UsageError("usage: run:stop run.N")
        return RunStop(options[0])
    if name == "run:logs":
        return _parse_logs(rest)
    if name == "run:help":
        return RunHelp()
    raise UsageError(f"unknown command {name!r}; run:help lists the reserved commands")


def _parse_run(text: str, attach: bool) -> Run:
    size, env = None, {}
    words = _words(text)
    index, start = 0, 0
    while index < len(words):
        word, end = words[index]
        if word == "--":
            start = end
            break
        if word.startswith("--size="):
            size = word.split("=", 1)[1]
        elif word in ("--size", "-s"):
            if index + 1 >= len(words):
                raise UsageError(f"{word} needs a size, such as standard-2x")
            size, end = words[index + 1]
            index += 1
        elif word in ("-e", "--env"):
            if index + 1 >= len(words):
                raise UsageError(f"{word} needs KEY=VALUE")
            pair, end = words[index + 1]
            key, sep, value = pair.partition("=")
            if not sep:
                raise UsageError(f"{word} needs KEY=VALUE, got {pair!r}")
            try:
                env[check_config_key(key)] = value
            except InvalidName as exc:
                raise UsageError(str(exc)) from None
            index += 1
        elif word.startswith("-"):
            raise UsageError(f"unknown option {word!r}; run:help lists the options")
        else:
            break
        start = end
        index += 1
    command = text[start:].strip()
    unquoted = unquote_word(command)
    if unquoted is not None:
        command = unquoted
    if not command.strip():
        raise UsageError("no command given; for example: run:detached 'rake jobs:work'")
    return Run(command=command, attach=attach, size=size, env=env)


# Characters that mean nothing special to sh outside quotes.
_PLAIN = frozenset("-_./,:=+@%^")


def unquote_word(text: str) -> str | None:
    """The value of `text` when it is exactly one shell word that starts with a quote
    (`'echo a; echo b'`, `"echo \\"hi\\""`, `'it'\\''s'`); None otherwise, and for
    unbalanced quotes. As in sh: nothing is special inside single quotes; inside double
    quotes a backslash escapes only $ ` " \\ and newline; outside quotes it escapes any
    character. Unquoted, only plain characters may join the word: a space, `;`, `|`,
    `$`, a glob and the like make it more than one quoted word, left as it is. `$VAR`
    inside double quotes is left for the dyno's shell to expand."""
    if not text or text[0] not in "'\"":
        return None
    value, i = [], 0
    while i < len(text):
        char = text[i]
        if char == "'":
            end = text.find("'", i + 1)
            if end < 0:
                return None
            value.append(text[i + 1 : end])
            i = end + 1
        elif char == '"':
            i += 1
            while i < len(text) and text[i] != '"':
                if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in '$`"\\\n':
                    if text[i + 1] != "\n":  # backslash-newline is a line continuation
                        value.append(text[i + 1])
                    i += 2
                else:
                    value.append(text[i])
                    i += 1
            if i >= len(text):
                return None
            i += 1
        elif char == "\\" and i + 1 < len(text):
            if text[i + 1] != "\n":
                value.append(text[i + 1])
            i += 2
        elif char.isalnum() or char in _PLAIN:
            value.append(char)
            i += 1
        else:
            return None  # a space, `;`, `|`, `$`, a glob...: more than one quoted word
    return "".join(value)


def _parse_logs(text: str) -> RunLogs:
    dyno, lines, tail = None, 100, False
    words = [word for word, _ in _words(text)]
    index = 0
    while index < len(words):
        word = words[index]
        if word in ("-p", "--dyno") and index + 1 < len(words):
            dyno = words[index + 1]
            index += 1
        elif word in ("-n", "--num") and index + 1 < len(words):
            if not words[index + 1].isdigit() or not 1 <= int(words[index + 1]) <= 1500:
                raise UsageError("-n takes a number of lines from 1 to 1500")
            lines = int(words[index + 1])
            index += 1
        elif word in ("-t", "--tail"):
            tail = True
        else:
            raise UsageError("usage: run:logs [-p run.N] [-n N] [--tail]")
        index += 1
    return RunLogs(dyno=dyno, lines=lines, tail=tail)


def size_label(size: str) -> str:
    """Heroku's display form of a size name: standard-1x -> Standard-1X."""
    return "-".join(
        part.upper() if len(part) <= 2 else part.capitalize() for part in size.split("-")
    )


def ago(seconds: float) -> str:
    """Heroku's rough age, as `heroku ps` prints it: `~ 5s`, `~ 3m`, `~ 2h`, `~ 1d`."""
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"~ {int(seconds // length)}{unit}"
    return f"~ {max(int(seconds), 0)}s"


def dyno_json(dyno: DynoInfo) -> dict[str, object]:
    """The fields `heroku ps --json` gives a one-off dyno, and what is inside it now."""
    return {
        "name": dyno.name,
        "type": "run",
        "command": dyno.command,
        "size": dyno.size,
        "state": dyno.state,
        "attached": dyno.attached,
        "created_at": iso_time(dyno.created_at),
        "updated_at": iso_time(dyno.since),
        "sessions": dyno.sessions,
        "forwarded_connections": dyno.forwards,
    }


def inside(dyno: DynoInfo) -> str:
    """What runs inside a dyno besides its command, as run:list and `heroku ps` show it
    after the command: ` (2 sessions, 1 forwarded connection)`, or nothing."""
    parts = [
        f"{count} {word}{'' if count == 1 else 's'}"
        for count, word in ((dyno.sessions, "session"), (dyno.forwards, "forwarded connection"))
        if count
    ]
    return f" ({', '.join(parts)})" if parts else ""


def iso_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_ps(dynos: Sequence[DynoInfo], now: float) -> str:
    """`heroku ps`'s one-off section:

    === run: one-off processes (1)
    run.1 (Standard-1X): up 2026/11/29 12:00:00 +0000 (~ 1m ago): bash (1 session)
    """
    lines = [f"=== run: one-off processes ({len(dynos)})"]
    for dyno in dynos:
        when = datetime.fromtimestamp(dyno.since, UTC).strftime("%Y/%m/%d %H:%M:%S +0000")
        lines.append(
            f"{dyno.name} ({size_label(dyno.size)}): {dyno.state} {when} "
            f"({ago(now - dyno.since)} ago): {dyno.command}{inside(dyno)}"
        )
    return "\n".join(lines) + "\n"
