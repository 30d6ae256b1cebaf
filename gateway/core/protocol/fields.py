"""What the protocol's messages are made of: the errors, the checks each field goes
through when a message is built, the terminal a session asks for, and the checks a
request to run a process (Run, Enter) shares. Pure; messages.py builds on it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

# The longest command: what one argument of exec can hold (Linux's MAX_ARG_STRLEN, minus
# its NUL). Longer scripts go on stdin (`ssh APP@HOST bash < script.sh`).
MAX_COMMAND = 128 * 1024 - 1
MAX_NAME = 256  # app, dyno, size, connection ids, terminal types
MAX_ENV = 64 * 1024  # all of a request's extra environment
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Subsystems a session may ask for: `sftp` (OpenSSH's sftp and scp).
SUBSYSTEMS = frozenset({"sftp"})


class ProtocolError(Exception):
    """A message or a sequence that is not this protocol."""


class LocalProtocolError(ProtocolError):
    """We were about to send something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


# -- checks used by the messages ---------------------------------------------------------


def check_text(value: object, what: str, limit: int = MAX_NAME, empty: bool = False) -> None:
    if not isinstance(value, str):
        raise LocalProtocolError(f"{what} must be a string")
    if len(value.encode(errors="surrogatepass")) > limit:
        raise LocalProtocolError(f"{what} is over {limit} bytes")
    if not empty and not value:
        raise LocalProtocolError(f"{what} must not be empty")
    if "\0" in value:
        raise LocalProtocolError(f"{what} holds a NUL byte")


def check_optional_text(value: object, what: str) -> None:
    if value is not None:
        check_text(value, what)


def check_flag(value: object, what: str) -> None:
    if not isinstance(value, bool):
        raise LocalProtocolError(f"{what} must be true or false")


def check_count(value: object, what: str, limit: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise LocalProtocolError(f"{what} must be a whole number from 0 to {limit}")


def check_lines(value: object, what: str) -> None:
    if not isinstance(value, tuple) or not all(isinstance(line, str) for line in value):
        raise LocalProtocolError(f"{what} must be a list of strings")


def check_names(value: object, what: str, limit: int) -> None:
    check_lines(value, what)
    assert isinstance(value, tuple)
    if len(value) > limit:
        raise LocalProtocolError(f"{what} holds more than {limit}")
    for name in value:
        check_text(name, what)


# -- terminals and processes -------------------------------------------------------------


@dataclass(frozen=True)
class Pty:
    term: str
    cols: int
    rows: int

    def __post_init__(self) -> None:
        check_text(self.term, "pty term", empty=True)
        check_count(self.cols, "pty cols", 10000)
        check_count(self.rows, "pty rows", 10000)


class ProcessRequest(Protocol):
    """What Run and Enter have in common."""

    @property
    def command(self) -> str | None: ...
    @property
    def connection(self) -> str: ...
    @property
    def pty(self) -> Pty | None: ...
    @property
    def env(self) -> dict[str, str]: ...
    @property
    def subsystem(self) -> str | None: ...


def check_process(request: ProcessRequest) -> None:
    """The checks Run and Enter share: what the process runs, with what."""
    command = request.command
    if command is not None:
        if not isinstance(command, str):
            raise LocalProtocolError("command must be a string")
        size = len(command.encode(errors="surrogatepass"))
        if size > MAX_COMMAND:
            raise LocalProtocolError(
                f"the command is {size} bytes, more than the {MAX_COMMAND} one process "
                "argument can hold; send a long script on stdin instead "
                "(ssh APP@HOST bash < script.sh)"
            )
        if "\0" in command:
            raise LocalProtocolError("the command holds a NUL byte, which no exec can take")
    check_text(request.connection, "connection")
    if request.pty is not None and not isinstance(request.pty, Pty):
        raise LocalProtocolError("pty must be a terminal's type and size")
    if not isinstance(request.env, dict):
        raise LocalProtocolError("env must map names to values")
    total = 0
    for name, value in request.env.items():
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise LocalProtocolError(f"env: {str(name)[:64]!r} is not a variable name")
        check_text(value, f"env {name}", limit=MAX_ENV, empty=True)
        total += len(name) + len(value)
    if total > MAX_ENV:
        raise LocalProtocolError(f"env is over {MAX_ENV} bytes")
    if request.subsystem is not None:
        if request.subsystem not in SUBSYSTEMS:
            raise LocalProtocolError(f"subsystem {str(request.subsystem)[:32]!r} is not offered")
        if command is not None or request.pty is not None:
            raise LocalProtocolError("a subsystem runs without a command or a terminal")


def count_streams(pty: Pty | None, subsystem: str | None, merge_output: bool) -> int:
    if pty is not None:
        return 1
    return 2 if subsystem is not None or merge_output else 3
