"""A running dyno as the manager holds it: its process group and its streams."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import struct
import termios

import trio

from gateway.core.applog import LineSplitter
from gateway.core.messages import Pty
from gateway.manager.applog import AppLog
from gateway.manager.sandbox import DynoSpec
from gateway.manager.spawn import Child


class Stdio:
    """A dyno's standard streams: a PTY, or pipes. `child` are the dyno's ends, `front`
    go to the SSH front, `kept` stay with the manager (a PTY master, or the stdout and
    stderr read ends) to find the foreground job and to read a detached dyno's output.
    A dyno started detached gets /dev/null for stdin and nothing for the front; `merge`
    gives stdout and stderr one pipe, so their order survives."""

    def __init__(self, pty: Pty | None, attach: bool = True, merge: bool = False) -> None:
        if pty is not None:
            master, slave = os.openpty()
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", pty.rows, pty.cols, 0, 0))
            self.child, self.front, self.kept = [slave] * 3, [os.dup(master)], [master]
        else:
            in_r = os.open(os.devnull, os.O_RDONLY)
            in_w = None
            if attach:
                in_r, in_w = os.pipe()
            out_r, out_w = os.pipe()
            if merge:
                self.child, self.kept = [in_r, out_w, out_w], [out_r]
            else:
                err_r, err_w = os.pipe()
                self.child, self.kept = [in_r, out_w, err_w], [out_r, err_r]
            self.front = [in_w, *map(os.dup, self.kept)] if in_w is not None else []

    def close_child(self) -> None:
        _close_all(self.child)
        self.child = []

    def close_front(self) -> None:
        _close_all(self.front)
        self.front = []

    def close(self) -> None:
        self.close_child()
        self.close_front()
        _close_all(self.kept)
        self.kept = []


def _close_all(fds: list[int]) -> None:
    for fd in set(fds):
        os.close(fd)


class Dyno:
    """A running dyno's process group and the manager's ends of its streams."""

    def __init__(self, process: Child, spec: DynoSpec, stdio: Stdio) -> None:
        self.process = process
        self.spec = spec
        self.pgid = process.pid  # a new session: the dyno's process is its group leader
        self.master = stdio.kept[0] if spec.pty is not None else None
        self.outputs = list(stdio.kept)
        self.detached = False
        self.output_done = trio.Event()
        # Cancelled by run:stop; the supervising task then stops the dyno.
        self.stop_scope = trio.CancelScope()

    def signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, sig)

    def signal_foreground(self, sig: signal.Signals) -> None:
        """Signal the terminal's foreground job (a shell's current command), or the group."""
        pgid = self.pgid
        if self.master is not None:
            with contextlib.suppress(OSError):
                pgid = os.tcgetpgrp(self.master)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)

    async def stop(self, grace: float) -> bool:
        """SIGTERM, `grace` seconds, then SIGKILL: how Heroku stops and cycles dynos.
        Returns whether the dyno ended within the grace."""
        self.signal_group(signal.SIGTERM)
        with trio.move_on_after(grace):
            await self.process.wait()
            return True
        self.signal_group(signal.SIGKILL)
        await self.process.wait()
        return False

    def end_group(self) -> None:
        """The dyno ends with its process: whatever it left running goes too."""
        self.signal_group(signal.SIGKILL)

    async def capture_output(self, log: AppLog) -> None:
        """Copy the dyno's output into the app log as `app[run.N]` lines until EOF."""
        async with trio.open_nursery() as nursery:
            for fd in self.outputs:
                nursery.start_soon(self._capture, fd, log)
        self.output_done.set()

    async def _capture(self, fd: int, log: AppLog) -> None:
        splitter = LineSplitter()
        async with trio.lowlevel.FdStream(os.dup(fd)) as stream:
            while True:
                try:
                    data = await stream.receive_some(65536)
                except (trio.BrokenResourceError, OSError):
                    data = b""  # EIO: the PTY's last slave fd closed
                lines = splitter.feed(data) if data else splitter.flush()
                log.output(self.spec.app, self.spec.name, lines)
                if not data:
                    return
