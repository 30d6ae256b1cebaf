"""One SSH session = one attached one-off dyno (or one reserved command); for the user
`APP.DYNO`, one process entered into that running dyno (docs/exec.md). The `sftp`
subsystem is sftp-server, run in a fresh dyno or in the dyno addressed.

The session asks the manager for a dyno (or a process in one), receives its stdio (or
PTY master) as fds, and pumps bytes between them and the channel. The exit status goes
to the client only after the dyno's last output byte, as sshd does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncssh

from gateway.core import commands
from gateway.core import protocol as p
from gateway.core.dyno_access import Login
from gateway.core.prelimits import filter_env
from gateway.eventlog import EventLog, event_log
from gateway.front.attached import AttachedSessions
from gateway.front.attachment import Attachment, Client
from gateway.front.link import Connector, ManagerLink
from gateway.front.observe import Observer, SessionTrace
from gateway.front.reserved import ReservedCommand
from gateway.ipc import ManagerGone, ManagerRefused, ManagerUnavailable

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionServices:
    """What every session of this front shares: settings and the front's own objects."""

    manager: Connector  # how to reach the dyno manager
    banner: bool
    idle_timeout: int
    sessions: AttachedSessions
    observer: Observer
    # Client `env` requests that reach the dyno ([ssh] accept_env); none when empty.
    accept_env: tuple[str, ...] = ()
    # The host and port users reach the gateway at ([ssh] public_host, public_port), for
    # the commands a reserved command tells them to run next.
    public_address: tuple[str, int] = ("HOST", 22)


class SSHSession(asyncssh.SSHServerSession[bytes]):
    """An SSH session channel. It is the reserved commands' Console, and an Attached
    session for the front's shutdown."""

    def __init__(
        self,
        app: str,
        connection: str,
        services: SessionServices,
        ended: Callable[[], None] | None = None,
        dyno: str | None = None,
    ) -> None:
        self.app = app
        self.dyno = dyno  # the running dyno the session goes into (user APP.DYNO)
        self._ended = ended  # the connection counts its sessions (max_sessions)
        self.connection = connection
        self.services = services
        self.log: EventLog = event_log(__name__, app=app, dyno=dyno, conn=connection)
        self._chan: asyncssh.SSHServerChannel[bytes] | None = None
        self._pty: p.Pty | None = None
        self._command: str | None = None
        self._subsystem: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._signals: set[asyncio.Task[None]] = set()  # kept until done (asyncio's rule)
        self._links: list[ManagerLink] = []
        self._attachment: Attachment | None = None
        self._trace: SessionTrace | None = None
        self._reserved: commands.Reserved | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._on_interrupt: Callable[[], None] | None = None

    # -- requests before the session starts --------------------------------------------

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self._chan = chan

    def pty_requested(
        self, term_type: str, term_size: tuple[int, int, int, int], _modes: Any
    ) -> bool:
        cols, rows = term_size[0] or 80, term_size[1] or 24
        try:
            self._pty = p.Pty(term=term_type or "xterm", cols=cols, rows=rows)
        except p.LocalProtocolError as exc:
            self.log.info("pty refused error=%s", exc)
            return False
        return True

    def shell_requested(self) -> bool:
        return True

    def exec_requested(self, command: str) -> bool:
        self._command = command
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        if subsystem not in p.SUBSYSTEMS:
            self.log.info("subsystem refused subsystem=%r", subsystem[:64])
            return False
        self._subsystem = subsystem
        self._pty = None  # sftp-server speaks binary on pipes, as sshd runs it
        return True

    def session_started(self) -> None:
        chan = self._chan
        assert chan is not None
        try:
            # In a running dyno, a command is the shell's, never a reserved one.
            entered_or_subsystem = self.dyno is not None or self._subsystem is not None
            command = None if entered_or_subsystem else self._command
            self._reserved = commands.parse(command) if command else None
        except commands.UsageError as exc:
            self.fail(str(exc))
            return
        if self._reserved is None or (
            isinstance(self._reserved, commands.Run) and self._reserved.attach
        ):
            # Made now, so input that arrives before the dyno is up is held, not lost.
            self._attachment = Attachment(
                Client(chan.write, chan.write_stderr, chan.pause_reading, chan.resume_reading),
                self.services.idle_timeout,
                self._idle_cutoff,
            )
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._task.add_done_callback(self._task_done)

    # -- while it runs -----------------------------------------------------------------

    def data_received(self, data: bytes, _datatype: Any) -> None:
        if self._on_interrupt is not None:
            if b"\x03" in data:  # Ctrl-C on a terminal in raw mode
                self._on_interrupt()
        elif self._attachment is not None:
            self._attachment.feed(data)

    def eof_received(self) -> bool:
        if self._attachment is not None:
            self._attachment.feed_eof()
        return True  # keep our side open: the dyno's output is still to come

    def signal_received(self, signal: str) -> None:
        if signal not in p.SIGNALS:
            self.log.info("signal refused signal=%r", signal[:32])
            return
        if self._links:
            task = asyncio.get_running_loop().create_task(self._links[-1].signal(signal))
            self._signals.add(task)
            task.add_done_callback(self._signals.discard)

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
        if self._ended is not None:
            self._ended()
            self._ended = None
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
            self.log.error("manager unavailable error=%s", exc)
            self.fail("the dyno manager is not available; try again shortly")
        finally:
            self._close()

    def _request(
        self, command: str | None, size: str | None, env: dict[str, str] | None
    ) -> p.Run | p.Enter:
        """A new dyno, or (user APP.DYNO) a process inside the running one."""
        env = {**self._client_env(), **(env or {})}  # `run -e K=V` wins
        if self.dyno is not None:
            return p.Enter(
                app=self.app, dyno=self.dyno, command=None if self._subsystem else command,
                connection=self.connection, pty=self._pty, env=env, subsystem=self._subsystem,
            )  # fmt: skip
        return p.Run(
            app=self.app, command=None if self._subsystem else command,
            connection=self.connection, pty=self._pty, env=env, size=size,
            subsystem=self._subsystem,
        )  # fmt: skip

    async def _attach(
        self, command: str | None, size: str | None = None, env: dict[str, str] | None = None
    ) -> None:
        chan, attachment = self._chan, self._attachment
        assert chan is not None and attachment is not None
        if self.dyno is not None and (problem := Login(self.app, self.dyno).dyno_problem()):
            self.fail(problem)
            return
        try:
            run = self._request(command, size, env)
        except p.LocalProtocolError as exc:  # too large for any dyno: the user's to fix
            self.fail(str(exc))
            return
        link = await self.open_link()
        try:
            streams = await link.start(run)
        except ManagerRefused as exc:
            self.fail(str(exc))
            return
        except ManagerGone:
            self.fail("the dyno manager went away; try again shortly")
            return
        dyno = streams.dyno
        entered = isinstance(run, p.Enter)
        self.log = self.log.bind(dyno=dyno.name)
        self.log.info(
            "session %s pty=%s subsystem=%s",
            "entered" if entered else "attached", self._pty is not None, self._subsystem,
        )  # fmt: skip
        if self._pty is not None and self.services.banner and not entered:
            shown = command or "bash"
            chan.write_stderr(
                f"Running `{shown}` attached to terminal... up, {dyno.name}\r\n".encode()
            )
        attachment.start(streams.fds, pty=self._pty is not None)
        self.services.sessions.add(self)
        self._trace = self.services.observer.session(
            self.connection, self.app, dyno.name, dyno.size, run.command,
            self._pty is not None, "ssh", entered, self._subsystem,
        )  # fmt: skip
        try:
            exit = await link.exited()
        except ManagerGone:
            await attachment.drained()
            self.log.error("manager lost the dyno")
            self.fail("the dyno manager went away; the dyno's end is unknown")
            return
        await attachment.drained()
        self.log.info("session ended status=%s signal=%s", exit.status, exit.signal)
        self._trace.exit_status, self._trace.exit_signal = exit.status, exit.signal
        if exit.signal:
            chan.exit_with_signal(exit.signal)
        else:
            chan.exit(exit.status if exit.status is not None else 255)

    def _client_env(self) -> dict[str, str]:
        """The client's env requests that [ssh] accept_env lets through to the dyno."""
        assert self._chan is not None
        accepted, refused = filter_env(self._chan.get_environment(), self.services.accept_env)
        if refused:
            names = ",".join(repr(name[:64]) for name in refused[:10])
            self.log.info("env refused names=%s count=%d", names, len(refused))
        return accepted

    def _idle_cutoff(self) -> None:
        """No bytes either way for idle_timeout: close the session; the dyno is hung up
        when the link closes, as on a disconnect."""
        self.log.info("session idle, closing idle_timeout=%d", self.services.idle_timeout)
        if self._chan is not None:
            self._chan.write_stderr(
                f"\r\ngateway: no input or output for {self.services.idle_timeout} s, "
                "closing the session\r\n".encode()
            )
            self._chan.close()

    # -- Console (for reserved commands) -----------------------------------------------

    async def open_link(self) -> ManagerLink:
        link = await ManagerLink.open(self.services.manager)
        self._links.append(link)
        return link

    def fail(self, message: str) -> None:
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

    async def writable(self) -> None:
        await self._writable.wait()

    def on_interrupt(self, callback: Callable[[], None]) -> None:
        self._on_interrupt = callback

    def ssh_command(self) -> str:
        host, port = self.services.public_address
        return f"ssh {self.app}@{host}" if port == 22 else f"ssh -p {port} {self.app}@{host}"

    # -- Attached (for the front's shutdown) -------------------------------------------

    def notify(self, text: str) -> None:
        self.write(f"{text}\n", stderr=True)

    def hang_up(self) -> None:
        if self._chan is not None:
            self._chan.close()

    def _close(self) -> None:
        """Release everything; closing the links is what tells the manager we are gone."""
        self.services.sessions.discard(self)
        if self._attachment is not None:
            if self._trace is not None:
                self._trace.ended(self._attachment.bytes_in, self._attachment.bytes_out)
            self._attachment.close()
        for link in self._links:
            link.close()
        self._links.clear()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.log.error("session failed", exc_info=task.exception())
            if self._chan is not None:
                self._chan.close()
