"""A running dyno as the manager holds it: its process group, its init and its streams."""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import signal
import termios

import trio

from gateway.core.applog import LineSplitter
from gateway.manager.applog import AppLog
from gateway.manager.dyno_init import InitControl
from gateway.manager.sandbox import DynoSpec, Inside, Launched
from gateway.manager.stdio import Stdio

# Reading a dyno's output for the app log: the most at once, and the pause between
# reads while it is over its rate (docs/configuration.md, [logs]).
CAPTURE_CHUNK = 256 * 1024
CAPTURE_BACKOFF = 0.1
# Linux's ioctl for a terminal's session; Python's termios module does not name it.
TIOCGSID = getattr(termios, "TIOCGSID", 0x5429)


class RunningDyno:
    """A running dyno: its process group (the spawned process leads it), its init (which
    sees every process of the dyno, job-control groups and orphans included, and starts
    the processes entered into it), and the manager's ends of its streams."""

    def __init__(self, launched: Launched, spec: DynoSpec, stdio: Stdio) -> None:
        self.process = launched.process
        self.spec = spec
        self.init: InitControl = launched.init
        self.inside: Inside = launched.inside
        self.pgid = self.process.pid  # a new session: the dyno's process is its group leader
        self.master = stdio.kept[0] if spec.pty is not None else None
        self.outputs = list(stdio.kept)
        self.detached = False
        self.output_done = trio.Event()
        # Cancelled by run:stop; the supervising task then stops the dyno.
        self.stop_scope = trio.CancelScope()
        # Processes entered into it and forwarded connections into it, now (run:list).
        self.sessions = 0
        self.forwards = 0
        # Set when its command (and so the dyno) has ended.
        self.ended = trio.Event()

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

    def hang_up(self) -> None:
        """The client is gone. As the kernel does for sshd when a terminal's master
        closes: SIGHUP, then SIGCONT, to the session's leader and to the terminal's
        foreground group (an interactive shell then hangs up its own jobs); without a
        terminal, to the dyno's process group. What survives it (`nohup`, a trap) runs
        on detached: the dyno now lasts until its last process ends, its output going
        to the app log."""
        self.detached = True
        # First, so that the init does not end the rest with the command, and re-sends
        # the hang-up to a command that has not exec'd yet.
        self.init.send(b"h")
        targets: list[tuple[int, bool]] = [(self.pgid, True)]  # (pid, is a group)
        if self.master is not None:
            sid = array.array("i", [0])
            with contextlib.suppress(OSError):
                fcntl.ioctl(self.master, TIOCGSID, sid)
                targets = [(sid[0], False)]
            with contextlib.suppress(OSError):
                targets.append((os.tcgetpgrp(self.master), True))
        for sig in (signal.SIGHUP, signal.SIGCONT):
            for pid, group in targets:
                if pid > 0:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pid, sig) if group else os.kill(pid, sig)

    async def stop(self, grace: float) -> bool:
        """SIGTERM to every process of the dyno, `grace` seconds, then SIGKILL: how Heroku
        stops and cycles dynos. Returns whether the dyno ended within the grace."""
        self.init.send(b"t")
        with trio.move_on_after(grace):
            await self.process.wait()
            return True
        self.end_group()
        await self.process.wait()
        return False

    def end_group(self) -> None:
        """Every process of the dyno goes: through its init, and its process group in
        case the init itself is gone."""
        self.init.send(b"k")
        self.signal_group(signal.SIGKILL)

    def exit_status(self) -> int:
        """The command's status as a Popen return code (negative: that signal), after
        the process ended. The init reports the command's own wait status; the wrapper's
        code stands in if the init never said it."""
        status = self.init.main_status()
        if status is None:
            returncode = self.process.returncode
            assert returncode is not None
            return returncode
        return os.waitstatus_to_exitcode(status)

    async def capture_output(self, log: AppLog) -> None:
        """Copy the dyno's output into the app log as `app[run.N]` lines until EOF."""
        async with trio.open_nursery() as nursery:
            for fd in self.outputs:
                nursery.start_soon(self._capture, fd, log)
        self.output_done.set()

    async def _capture(self, fd: int, log: AppLog) -> None:
        """One output stream into the app log, within the dyno's rate (lines past it
        are dropped and counted). Over the rate, lines are counted, not split, and the
        reading pauses between chunks: a dyno that floods its output costs the manager
        a few reads a second, and waits on its full pipe meanwhile."""
        app, name = self.spec.app, self.spec.name
        splitter = LineSplitter()
        rate = log.rate()
        async with trio.lowlevel.FdStream(os.dup(fd)) as stream:
            while True:
                try:
                    data = await stream.receive_some(CAPTURE_CHUNK)
                except (trio.BrokenResourceError, OSError):
                    data = b""  # EIO: the PTY's last slave fd closed
                now = trio.current_time()
                if data and rate.over(now):
                    rate.drop(data.count(b"\n"))
                    splitter = LineSplitter()  # what it held is cut: start afresh
                else:
                    lines = splitter.feed(data) if data else splitter.flush()
                    log.output(app, name, rate.admit(lines, now))
                if dropped := rate.due(now, final=not data):
                    log.dropped(app, name, dropped)
                if not data:
                    return
                if rate.over(now):
                    await trio.sleep(CAPTURE_BACKOFF)
