"""One SSH session = one attached one-off dyno (or one reserved command).

The session asks the manager for a dyno, receives its stdio (or PTY master) as fds, and
pumps bytes between them and the channel. The exit status goes to the client only after
the dyno's last output byte, as sshd does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from gateway.core import commands
from gateway.core.messages import SIGNALS, Pty
from gateway.core.prelimits import filter_env
from gateway.front.attachment import Attachment, Client
from gateway.front.link import ManagerLink, ManagerUnavailable
from gateway.front.observe import Observer, SessionTrace
from gateway.front.reserved import ReservedCommand
from gateway.front.sessions import ActiveSessions
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
    sessions: ActiveSessions
    observer: Observer
    # Client `env` requests that reach the dyno ([ssh] accept_env); none when empty.
    accept_env: tuple[str, ...] = ()
    # The host and port users reach the gateway at ([ssh] public_host, public_port), for
    # the commands a reserved command tells them to run next.
    public_address: tuple[str, int] = ("HOST", 22)


class DynoSession(asyncssh.SSHServerSession):  # type: ignore[type-arg]
    def __init__(self, context: SessionContext) -> None:
        self.context = context
        self.where = f"app={context.app} conn={context.connection}"
        self._chan: asyncssh.SSHServerChannel | None = None
        self._pty: Pty | None = None
        self._command: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._link: ManagerLink | None = None
        self._attachment: Attachment | None = None
        self._trace: SessionTrace | None = None
        self._reserved: commands.Reserved | None = None
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
        chan = self._chan
        assert chan is not None
        try:
            self._reserved = commands.parse(self._command) if self._command else None
        except commands.UsageError as exc:
            self._fail(str(exc))
            return
        if self._reserved is None or (
            isinstance(self._reserved, commands.Run) and self._reserved.attach
        ):
            # Made now, so input that arrives before the dyno is up is held, not lost.
            self._attachment = Attachment(
                Client(chan.write, chan.write_stderr, chan.pause_reading, chan.resume_reading),
                self.context.idle_timeout,
                self._idle_cutoff,
            )
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._task.add_done_callback(self._task_done)

    # -- while it runs -----------------------------------------------------------------

    def data_received(self, data: bytes, _datatype: Any) -> None:
        if self.on_input is not None:
            self.on_input(data)
        elif self._attachment is not None:
            self._attachment.feed(data)

    def eof_received(self) -> bool:
        if self._attachment is not None:
            self._attachment.feed_eof()
        return True  # keep our side open: the dyno's output is still to come

    def signal_received(self, signal: str) -> None:
        if signal not in SIGNALS:
            log.info("signal refused %s signal=%r", self.where, signal)
            return
        if self._link is not None:
            asyncio.get_running_loop().create_task(self._send_signal(self._link, signal))

    def break_received(self, _msec: int) -> bool:
        return False

    def terminal_size_changed(self, width: int, height: int, _pw: int, _ph: int) -> None:
        if self._attachment is not None:
            self._attachment.resize(width, height)

    def pause_writing(self) -> None:
        self._writable.clear()
        if self._attachment is not None:
            self._attachment.pause_output()

    def resume_writing(self) -> None:
        self._writable.set()
        if self._attachment is not None:
            self._attachment.resume_output()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        else:
            self._close()

    # -- the dyno ----------------------------------------------------------------------

    async def _run(self) -> None:
        reserved = self._reserved
        try:
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
        chan, attachment = self._chan, self._attachment
        assert chan is not None and attachment is not None
        link = await self.open_link()
        pty = None
        if self._pty is not None:
            pty = {"term": self._pty.term, "cols": self._pty.cols, "rows": self._pty.rows}
        await link.send(
            "run",
            app=self.context.app,
            command=command,
            pty=pty,
            env={**self._client_env(), **(env or {})},  # `run -e K=V` wins
            size=size,
            connection=self.context.connection,
        )
        reply = await link.receive()
        if reply is None:
            self._fail("the dyno manager went away; try again shortly")
            return
        message, fds = reply
        if message["type"] != "started" or len(fds) != (1 if self._pty else 3):
            _close_fds(fds)
            if message["type"] == "error":
                self._fail(str(message.get("message", "the run was refused")))
            else:
                log.error("bad reply from the manager %s: %r", self.where, message)
                self._fail("the dyno manager sent a bad reply")
            return
        dyno = str(message["dyno"])
        self.where = f"app={self.context.app} dyno={dyno} conn={self.context.connection}"
        log.info("session attached %s pty=%s", self.where, self._pty is not None)
        if self._pty is not None and self.context.banner:
            shown = command or "bash"
            chan.write_stderr(f"Running `{shown}` attached to terminal... up, {dyno}\r\n".encode())
        attachment.start(fds, pty=self._pty is not None)
        self.context.sessions.add(self)
        self._trace = self.context.observer.session(
            self.context.connection, self.context.app, dyno, str(message.get("size", "")),
            command, self._pty is not None, "ssh",
        )  # fmt: skip
        exited = await link.receive()
        await attachment.drained()
        if exited is None or exited[0]["type"] != "exited":
            log.error("manager lost the dyno %s", self.where)
            self._fail("the dyno manager went away; the dyno's end is unknown")
            return
        status, signame = exited[0].get("status"), exited[0].get("signal")
        log.info("session ended %s status=%s signal=%s", self.where, status, signame)
        self._trace.exit_status, self._trace.exit_signal = status, signame
        if signame:
            chan.exit_with_signal(str(signame))
        else:
            chan.exit(int(status) if isinstance(status, int) else 255)

    def _client_env(self) -> dict[str, str]:
        """The client's env requests that [ssh] accept_env lets through to the dyno."""
        assert self._chan is not None
        accepted, refused = filter_env(self._chan.get_environment(), self.context.accept_env)
        if refused:
            names = ",".join(repr(name[:64]) for name in refused[:10])
            log.info("env refused %s names=%s count=%d", self.where, names, len(refused))
        return accepted

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

    @staticmethod
    async def _send_signal(link: ManagerLink, name: str) -> None:
        with contextlib.suppress(OSError):
            await link.send("signal", name=name)

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

    def notify(self, text: str) -> None:
        self.write(f"{text}\n", stderr=True)

    def hang_up(self) -> None:
        if self._chan is not None:
            self._chan.close()

    def _close(self) -> None:
        """Release everything; closing the link is what tells the manager we are gone."""
        self.context.sessions.discard(self)
        if self._attachment is not None:
            if self._trace is not None:
                self._trace.ended(self._attachment.bytes_in, self._attachment.bytes_out)
            self._attachment.close()
        if self._link is not None:
            self._link.close()
            self._link = None

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("session failed %s", self.where, exc_info=task.exception())
            if self._chan is not None:
                self._chan.close()


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
