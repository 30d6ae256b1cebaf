"""Reaching into a running dyno over SSH (docs/exec.md): the user `APP.DYNO`, where a
forwarded connection may go, and what sftp-server's log says happened to files."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from gateway.core.names import parse_dyno_name


@dataclass(frozen=True)
class Login:
    """An SSH user name: the app (whose keys it authenticates with) and, for `APP.DYNO`,
    the running dyno it addresses. A dot cannot occur in an app name."""

    app: str
    dyno: str | None

    @classmethod
    def parse(cls, user: str) -> Login:
        app, dot, dyno = user.partition(".")
        return cls(app, dyno if dot else None)

    def dyno_problem(self) -> str | None:
        """Why the dyno part cannot name a dyno (for the user), or None."""
        if self.dyno is None or parse_dyno_name(self.dyno) is not None:
            return None
        shown = self.dyno[:64] or "(empty)"
        return f"{shown!r} is not a dyno name: {self.app}'s one-off dynos are run.N (see run:list)"


def forward_addresses(host: str) -> tuple[str, ...] | None:
    """The addresses inside the dyno a forward to `host` may connect to, in order: the
    dyno's own loopback for `localhost`, `127.0.0.1` and `::1`; None for anything else."""
    if host.lower() == "localhost":
        return ("127.0.0.1", "::1")
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if address == ipaddress.IPv4Address("127.0.0.1"):
        return ("127.0.0.1",)
    if address == ipaddress.IPv6Address("::1"):
        return ("::1",)
    return None


# -- sftp-server's log (-l INFO, on stderr) -----------------------------------------------


@dataclass(frozen=True)
class FileTransfer:
    """A file closed by sftp-server: bytes read from it (sent to the client) and written
    to it (received from the client)."""

    path: str
    bytes_read: int
    bytes_written: int


@dataclass(frozen=True)
class FileChange:
    """A change that moves no file content: remove, mkdir, rmdir, rename, symlink,
    hardlink, setstat (`to`: the new name of a rename or a link)."""

    op: str
    path: str
    to: str | None = None


# sftp-server writes paths as they are (between quotes, not escaped): a greedy match
# takes a name holding quotes whole where the line's shape allows only one reading.
_CLOSE = re.compile(r'close "(?P<path>.*)" bytes read (?P<read>\d+) written (?P<written>\d+)')
_NAMED = re.compile(r'(?P<op>remove|rmdir|mkdir) name "(?P<path>.*)"(?: mode \S+)?')
_TWO = re.compile(
    r'(?P<op>rename|posix-rename|symlink|hardlink) old "(?P<path>.*?)" new "(?P<to>.*)"'
)
_SET = re.compile(r'set "(?P<path>.*)" (?:size|mode|modtime|owner) .*')


def parse_sftp_log(line: str) -> FileTransfer | FileChange | None:
    """What one line of sftp-server's log says happened to a file; None for the lines
    that change nothing (opens, listings, status replies, session start and end)."""
    line = line.rstrip("\r\n")
    if match := _CLOSE.fullmatch(line):
        return FileTransfer(match["path"], int(match["read"]), int(match["written"]))
    if match := _NAMED.fullmatch(line):
        return FileChange(match["op"], match["path"])
    if match := _TWO.fullmatch(line):
        op = "rename" if match["op"] == "posix-rename" else match["op"]
        return FileChange(op, match["path"], match["to"])
    if match := _SET.fullmatch(line):
        return FileChange("setstat", match["path"])
    return None
