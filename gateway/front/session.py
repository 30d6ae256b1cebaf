"""One SSH session = one attached one-off dyno.

The session asks the manager for a dyno, receives its stdio (or PTY master) as fds, and
pumps bytes between them and the channel. The exit status goes to the client only after
the dyno's last output byte, as sshd does.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import struct
import termios
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from gateway.core import commands
from gateway.core.messages import SIGNALS, Pty
from gateway.front.idle import IdleDeadline
from gateway.front.link import ManagerLink, ManagerUnavailable
from gateway.front.pumps import InputPump, OutputPump
from gateway.front.reserved import ReservedCommand
from gateway.store import Store

log = logging.getLogger("gateway.front")


@dataclass(frozen=True)
class SessionContext:
    app: str
    connection: str
    manager_socket: Path
    banner: bool
    idle_timeout: int
    store: Store


class DynoSession(asyncssh.SSHServerSession):  # type: ignore[type-arg]
    def __init__(self, context: SessionContext) -> None:
        self.context = context
        self.where = f"app={context.app} conn={context.connection}"
        self._chan: asyncssh.SSHServerChannel | None = None
        self._pty: Pty | None = None
        self._command: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._link: ManagerLink | None = None
        self._input: InputPump | None = None
        self._outputs: list[OutputPump] = []
        self._fds: list[int] = []
        self._early_input: list[bytes | None] = []
        self._idle: IdleDeadline | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self.on_input: Any = None  # reserved commands watch input (Ctrl-C ends a tail)

    # -- requests before the session starts --------------------------------------------

    def connection_made(self, chan: asyncssh.SSHServerChannel) -> None:
        self._chan = chan

    def pty_requested(
        self, term_type: str, term_size: tuple[int, int, int, int], _modes: Any
    ) -> bool:
        cols, rows = term_size[0] or 80, term_size[1] or 24
        self._pty = Pty(term=term_type or "xterm", cols=cols, rows=rows)
        return True

    def shell_requested(self) -> bool:
        return True

    def exec_requested(self, command: str) -> bool:
        self._command = command
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        log.info("subsystem refused %s subsystem=%r", self.where, subsystem)
        return False

    def session_started(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._task.add_done_callback(self._task_done)

    # -- while it runs -----------------------------------------------------------------

    def data_received(self, data: bytes, _datatype: Any) -> None:
        if self._idle is not None:
            self._idle.touch()
        if self._input is not None:
            self._input.feed(data)
        elif self.on_input is not None:
            self.on_input(data)
        else:
            # Until the dyno is up: hold it, and stop the channel so it stays one window.
            self._early_input.append(data)
            self._chan_pause()

    def eof_received(self) -> bool:
        if self._input is not None:
            self._input.feed_eof()
        else:
            self._early_input.append(None)
        return True  # keep our side open: the dyno's output is still to come

    def signal_received(self, signal: str) -> None:
        if signal not in SIGNALS:
            log.info("signal refused %s signal=%r", self.where, signal)
            return
        if self._link is not None:
            asyncio.get_running_loop().create_task(self._send_signal(signal))

    def break_received(self, _msec: int) -> bool:
        return False

    def terminal_size_changed(self, width: int, height: int, _pw: int, _ph: int) -> None:
        if self._pty is not None and self._fds:
            fcntl.ioctl(self._fds[0], termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    def pause_writing(self) -> None:
        self._writable.clear()
        for pump in self._outputs:
            pump.pause()

    def resume_writing(self) -> None:
        self._writable.set()
        for pump in self._outputs:
            pump.resume()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        else:
            self._close()

    # -- the dyno ----------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            try:
                reserved = commands.parse(self._command) if self._command is not None else None
            except commands.UsageError as exc:
                self._fail(str(exc))
                return
            if reserved is None:
                await self._attach(self._command)
            elif isinstance(reserved, commands.Run) and reserved.attach:
                await self._attach(reserved.command, reserved.size, reserved.env)
            else:
                await ReservedCommand(self, reserved).run()
        except ManagerUnavailable as exc:
            log.error("manager unavailable %s error=%s", self.where, exc)
            self._fail("the dyno manager is not available; try again shortly")
        finally:
            self._close()

    async def open_link(self) -> ManagerLink:
        """A new connection to the manager, closed with the session."""
        self._link = await ManagerLink.open(self.context.manager_socket)
        return self._link

    async def _attach(
        self, command: str | None, size: str | None = None, env: dict[str, str] | None = None
    ) -> None:
        chan = self._chan
        assert chan is not None
        link = await self.open_link()
        pty = None
        if self._pty is not None:
            pty = {"term": self._pty.term, "cols": self._pty.cols, "rows": self._pty.rows}
        await link.send(
            "run",
            app=self.context.app,
            command=command,
            pty=pty,
            env=env or {},
            size=size,
            attach=True,
            connection=self.context.connection,
        )
        reply = await link.receive()
        if reply is None:
            self._fail("the dyno manager went away; try again shortly")
            return
        message, fds = reply
        self._fds = fds
        if message["type"] == "error":
            self._fail(str(message.get("message", "the run was refused")))
            return
        if message["type"] != "started" or len(fds) != (1 if self._pty else 3):
            log.error("bad reply from the manager %s: %r", self.where, message)
            self._fail("the dyno manager sent a bad reply")
            return
        dyno = str(message["dyno"])
        self.where = f"app={self.context.app} dyno={dyno} conn={self.context.connection}"
        log.info("session attached %s pty=%s", self.where, self._pty is not None)
        if self._pty is not None and self.context.banner:
            shown = command or "bash"
            chan.write_stderr(f"Running `{shown}` attached to terminal... up, {dyno}\r\n".encode())
        self._idle = IdleDeadline(self.context.idle_timeout, self._idle_cutoff)
        drained = self._start_pumps(chan, fds)
        self._replay_early_input()
        exited = await link.receive()
        await drained
        if exited is None or exited[0]["type"] != "exited":
            log.error("manager lost the dyno %s", self.where)
            self._fail("the dyno manager went away; the dyno's end is unknown")
            return
        status, signame = exited[0].get("status"), exited[0].get("signal")
        log.info("session ended %s status=%s signal=%s", self.where, status, signame)
        if signame:
            chan.exit_with_signal(str(signame))
        else:
            chan.exit(int(status) if isinstance(status, int) else 255)

    def _start_pumps(self, chan: asyncssh.SSHServerChannel, fds: list[int]) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        drained: asyncio.Future[None] = loop.create_future()
        idle = self._idle
        assert idle is not None

        def out(write: Any) -> Any:
            def forward(data: bytes) -> None:
                idle.touch()
                write(data)

            return forward

        def on_eof() -> None:
            if all(pump.eof for pump in self._outputs) and not drained.done():
                drained.set_result(None)

        if self._pty is not None:
            (master,) = fds
            self._input = InputPump(master, self._chan_pause, chan.resume_reading, False)
            self._outputs = [OutputPump(master, out(chan.write), on_eof)]
        else:
            stdin, stdout, stderr = fds
            self._fds = [stdout, stderr]  # the input pump owns stdin from here
            self._input = InputPump(stdin, self._chan_pause, chan.resume_reading, True)
            self._outputs = [
                OutputPump(stdout, out(chan.write), on_eof),
                OutputPump(stderr, out(chan.write_stderr), on_eof),
            ]
        for pump in self._outputs:
            pump.resume()
        return drained

    def _replay_early_input(self) -> None:
        assert self._input is not None and self._chan is not None
        early, self._early_input = self._early_input, []
        for data in early:
            if data is None:
                self._input.feed_eof()
            else:
                self._input.feed(data)
        if early and not self._input.blocked:
            self._chan.resume_reading()

    def _idle_cutoff(self) -> None:
        """No bytes either way for idle_timeout: close the session; the dyno gets SIGHUP
        when the link closes, as on a disconnect."""
        log.info("session idle, closing %s idle_timeout=%d", self.where, self.context.idle_timeout)
        if self._chan is not None:
            self._chan.write_stderr(
                f"\r\ngateway: no input or output for {self.context.idle_timeout} s, "
                "closing the session\r\n".encode()
            )
            self._chan.close()

    def _chan_pause(self) -> None:
        if self._chan is not None:
            self._chan.pause_reading()

    async def _send_signal(self, name: str) -> None:
        try:
            if self._link is not None:
                await self._link.send("signal", name=name)
        except OSError:
            pass

    def _fail(self, message: str) -> None:
        self.write(f"gateway: {message}\n", stderr=True)
        self.exit(1)

    def write(self, text: str, stderr: bool = False) -> None:
        """Text for the client; line ends become CRLF when its terminal is in raw mode."""
        assert self._chan is not None
        if self._pty is not None:
            text = text.replace("\r\n", "\n").replace("\n", "\r\n")
        data = text.encode()
        if stderr:
            self._chan.write_stderr(data)
        else:
            self._chan.write(data)

    def exit(self, status: int) -> None:
        assert self._chan is not None
        self._chan.exit(status)

    @property
    def has_terminal(self) -> bool:
        return self._pty is not None

    async def writable(self) -> None:
        """Wait while the client is not taking our output (the channel paused us)."""
        await self._writable.wait()

    def _close(self) -> None:
        """Release everything; closing the link is what tells the manager we are gone."""
        if self._idle is not None:
            self._idle.cancel()
        for pump in self._outputs:
            pump.pause()
        if self._input is not None:
            self._input.close()
        if self._link is not None:
            self._link.close()
            self._link = None
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("session failed %s", self.where, exc_info=task.exception())
            if self._chan is not None:
                self._chan.close()
