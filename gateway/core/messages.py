"""The front <-> manager protocol: small JSON objects, one per SEQPACKET packet.

Pure: encoding, decoding and checking only. Both processes go through `decode`, so a
malformed packet is refused the same way on either side.

Each connection carries one request and what follows from it:

  run {app, command|null, pty|null, env, size|null, attach, await_attach, merge_output,
       connection}
      -> with await_attach: reserved {dyno, size}, then front -> manager: attach
      -> started {dyno, size} (+ fds when attached: a PTY master, or stdin/stdout/stderr,
         or stdin/output when merged)
      then, front -> manager: signal {name}; manager -> front: exited {status|null, signal|null}
      A closed connection means the client went away: the manager hangs up the dyno.
  stop {app, dyno}                     -> stopping {dyno}
  logs {app, dyno|null, lines, tail}   -> log {lines}... dropped {count}... end
Any request may instead be answered with error {message}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_PACKET = 64 * 1024

# RFC 4254 section 6.10 signal names; the only ones a client may send to a dyno.
SIGNALS = frozenset(
    {"ABRT", "ALRM", "FPE", "HUP", "ILL", "INT", "KILL", "PIPE", "QUIT", "SEGV", "TERM",
     "USR1", "USR2"}
)  # fmt: skip


class BadMessage(ValueError):
    """A packet that is not a message of this protocol."""


@dataclass(frozen=True)
class Pty:
    term: str
    cols: int
    rows: int


@dataclass(frozen=True)
class RunRequest:
    app: str
    command: str | None  # None: the client asked for a shell
    pty: Pty | None
    env: dict[str, str]
    connection: str
    size: str | None = None
    attach: bool = True
    # The rendezvous: reserve run.N now, start the process when the client arrives.
    await_attach: bool = False
    # One stream for stdout and stderr (the rendezvous carries them merged).
    merge_output: bool = False


@dataclass(frozen=True)
class StopRequest:
    app: str
    dyno: str


@dataclass(frozen=True)
class LogsRequest:
    app: str
    dyno: str | None
    lines: int
    tail: bool


def encode(kind: str, **fields: Any) -> bytes:
    data = json.dumps({"type": kind, **fields}, separators=(",", ":")).encode()
    if len(data) > MAX_PACKET:
        raise BadMessage(f"{kind} message of {len(data)} bytes is over {MAX_PACKET}")
    return data


def decode(data: bytes) -> dict[str, Any]:
    """A message as a dict with a str `type`, or BadMessage."""
    try:
        message = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadMessage("not JSON") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise BadMessage("not a message object with a type")
    return message


def _str(message: dict[str, Any], key: str, optional: bool = False) -> Any:
    value = message.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise BadMessage(f"{message['type']}: {key!r} must be a string")
    return value


def run_request(message: dict[str, Any]) -> RunRequest:
    """Check a `run` message field by field."""
    pty = message.get("pty")
    if pty is not None:
        if not isinstance(pty, dict):
            raise BadMessage("run: 'pty' must be an object")
        cols, rows = pty.get("cols"), pty.get("rows")
        if not all(isinstance(n, int) and 0 <= n <= 10000 for n in (cols, rows)):
            raise BadMessage("run: pty size out of range")
        pty = Pty(term=_str(pty | {"type": "run"}, "term"), cols=cols, rows=rows)
    env = message.get("env", {})
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise BadMessage("run: 'env' must map strings to strings")
    flags = {}
    for name, default in (("attach", True), ("await_attach", False), ("merge_output", False)):
        flags[name] = message.get(name, default)
        if not isinstance(flags[name], bool):
            raise BadMessage(f"run: {name!r} must be true or false")
    return RunRequest(
        app=_str(message, "app"),
        command=_str(message, "command", optional=True),
        pty=pty,
        env=env,
        connection=_str(message, "connection"),
        size=_str(message, "size", optional=True),
        **flags,
    )


def stop_request(message: dict[str, Any]) -> StopRequest:
    return StopRequest(app=_str(message, "app"), dyno=_str(message, "dyno"))


def logs_request(message: dict[str, Any]) -> LogsRequest:
    lines = message.get("lines", 100)
    if isinstance(lines, bool) or not isinstance(lines, int) or not 0 <= lines <= 100_000:
        raise BadMessage("logs: 'lines' must be a count")
    tail = message.get("tail", False)
    if not isinstance(tail, bool):
        raise BadMessage("logs: 'tail' must be true or false")
    return LogsRequest(
        app=_str(message, "app"),
        dyno=_str(message, "dyno", optional=True),
        lines=lines,
        tail=tail,
    )


def batches(lines: list[str], limit: int = MAX_PACKET - 1024) -> list[list[str]]:
    """Split lines into groups whose `log` message fits one packet."""
    groups: list[list[str]] = [[]]
    size = 0
    for line in lines:
        cost = len(json.dumps(line)) + 1
        if groups[-1] and size + cost > limit:
            groups.append([])
            size = 0
        groups[-1].append(line)
        size += cost
    return groups if groups[0] else []


def signal_name(message: dict[str, Any]) -> str:
    name = _str(message, "name")
    if name not in SIGNALS:
        raise BadMessage(f"signal {name!r} is not allowed")
    return name
