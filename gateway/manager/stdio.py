"""A dyno's standard streams: a PTY or pipes, and who holds which end."""

from __future__ import annotations

import fcntl
import os
import struct
import termios
from collections.abc import Callable

import trio

from gateway.core.applog import LineSplitter
from gateway.core.protocol import Pty


class Stdio:
    """A dyno's standard streams: a PTY, or pipes. `child` are the dyno's ends, `front`
    go to the SSH front, `kept` stay with the manager (a PTY master, or the stdout and
    stderr read ends) to find the foreground job and to read a detached dyno's output.
    A dyno started detached gets /dev/null for stdin and nothing for the front; `merge`
    gives stdout and stderr one pipe, so their order survives. With `audit_stderr` (a
    subsystem: sftp-server logs there), stderr's read end is `audit`, the manager's
    alone, and the front gets stdin and stdout."""

    def __init__(
        self, pty: Pty | None, attach: bool = True, merge: bool = False, audit_stderr: bool = False
    ) -> None:
        self.audit: int | None = None
        if pty is not None:
            master, slave = os.openpty()
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", pty.rows, pty.cols, 0, 0))
            self.child, self.front, self.kept = [slave] * 3, [os.dup(master)], [master]
        else:
            in_w = None
            if attach:
                in_r, in_w = os.pipe()
            else:
                in_r = os.open(os.devnull, os.O_RDONLY)
            out_r, out_w = os.pipe()
            if merge:
                self.child, self.kept = [in_r, out_w, out_w], [out_r]
            else:
                err_r, err_w = os.pipe()
                self.child, self.kept = [in_r, out_w, err_w], [out_r, err_r]
                if audit_stderr:
                    self.kept, self.audit = [out_r], err_r
            self.front = [in_w, *map(os.dup, self.kept)] if in_w is not None else []

    def close_child(self) -> None:
        _close_all(self.child)
        self.child = []

    def close_front(self) -> None:
        _close_all(self.front)
        self.front = []

    def close_kept(self) -> None:
        _close_all(self.kept)
        self.kept = []

    def close(self) -> None:
        self.close_child()
        self.close_front()
        self.close_kept()
        if self.audit is not None:
            os.close(self.audit)
            self.audit = None


def _close_all(fds: list[int]) -> None:
    for fd in set(fds):
        os.close(fd)


async def read_lines(fd: int, take: Callable[[list[str]], None]) -> None:
    """Read `fd` (through a copy of it) until EOF, giving `take` its whole lines as they
    come, then the last one without a line end (PTY or pipe, CRLF or LF)."""
    splitter = LineSplitter()
    async with trio.lowlevel.FdStream(os.dup(fd)) as stream:
        while True:
            try:
                data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, OSError):
                data = b""  # EIO: the PTY's last slave fd closed
            take(splitter.feed(data) if data else splitter.flush())
            if not data:
                return
