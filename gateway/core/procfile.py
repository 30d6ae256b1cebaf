"""Heroku Procfiles: parsing, and expanding a process type into its command.

A Procfile maps process types to commands, one ``type: command`` per line.
Blank lines and ``#`` comments are ignored. Like Heroku, ``resolve_command``
works on text: ``worker 42`` runs the ``worker`` command with `` 42`` appended.
"""

import re

__all__ = ["ProcfileError", "parse_procfile", "resolve_command"]

_LINE = re.compile(r"([A-Za-z0-9_-]+):\s*(\S.*)")
_FIRST_WORD = re.compile(r"\s*(\S+)\s*(.*)", re.DOTALL)


class ProcfileError(ValueError):
    """A Procfile line that is not ``type: command``; the message names the line."""


def parse_procfile(text: str) -> dict[str, str]:
    """Return ``{process type: command}`` for the Procfile ``text``.

    Lines are split on ``\\n`` only (``\\r`` is stripped), so line numbers in
    errors match what an editor shows. A type defined twice is an error rather
    than a silent override, since one of the two commands would never run.
    """
    commands: dict[str, str] = {}
    defined_on: dict[str, int] = {}
    for number, raw in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.fullmatch(line)
        if match is None:
            raise ProcfileError(f"line {number}: expected 'type: command', got {_clip(line)!r}")
        name, command = match.group(1), match.group(2)
        if name in commands:
            raise ProcfileError(
                f"line {number}: process type {name!r} is already defined on line "
                f"{defined_on[name]}"
            )
        commands[name] = command
        defined_on[name] = number
    return commands


def resolve_command(command: str, procfile: dict[str, str]) -> str:
    """Expand a leading process type in ``command`` into its Procfile command.

    The rest of ``command`` is appended verbatim after one space; a command
    whose first word is not a process type is returned unchanged.
    """
    match = _FIRST_WORD.fullmatch(command)
    if match is None or match.group(1) not in procfile:
        return command
    expanded, rest = procfile[match.group(1)], match.group(2)
    return f"{expanded} {rest}" if rest else expanded


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
