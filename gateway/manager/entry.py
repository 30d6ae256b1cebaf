"""Into a running dyno (docs/exec.md): a process entered into it (`ssh APP.run.N`, sftp)
and a TCP connection made inside its network (`ssh -L`, `-D`), each the task of the
front connection that asked for it.

The dyno's init does the work inside the dyno (dyno_init_sessions.c): it is already in
every namespace, the cgroup and the root of the dyno, as its user. An entered process is
the init's child, in a session of its own; its end comes back on the session's own
socket, and the dyno's end ends it (the init kills every process of the dyno). A
forwarded connection is a socket the init connected to the dyno's loopback; the front
pumps it, and is told when the dyno ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket

import trio

from gateway.audit import AuditLog
from gateway.config import Config
from gateway.core.dyno import ENDED, Exit
from gateway.core.environment import with_terminal
from gateway.core.protocol import (
    DynoInfo,
    Ended,
    Enter,
    Exited,
    Forward,
    Forwarded,
    RemoteProtocolError,
    Started,
)
from gateway.eventlog import EventLog, event_log
from gateway.ipc import ANCILLARY_SPACE, close_all, received_fds
from gateway.manager.connection import FrontConnection
from gateway.manager.dyno import RunningDyno
from gateway.manager.sftp import (
    SUBSYSTEM_GRACE,
    SubsystemUnavailable,
    audit_sftp_log,
    subsystem_command,
)
from gateway.manager.stdio import Stdio
from gateway.manager.supervisor import Refused, Supervisor
from gateway.store import Store

# How long the init may take to answer (it forks, or connects without waiting).
ANSWER_TIMEOUT = 10.0
# After an entered process ended, how long its log (sftp-server's) may take to reach EOF.
LOG_DRAIN = 5.0


class DynoEntry:
    def __init__(self, config: Config, store: Store, supervisor: Supervisor, audit: AuditLog):
        self.config = config
        self.store = store
        self.supervisor = supervisor
        self.audit = audit

    def find(self, app: str, name: str) -> RunningDyno:
        """The running dyno `name` of `app` on this node, or Refused saying why not."""
        dyno = self.supervisor.running.get((app, name))
        if dyno is not None:
            return dyno
        record = self.store.get_dyno(app, name)
        if record is None:
            raise Refused(f"{app} has no dyno {name}; see run:list")
        if record.state in ENDED:
            raise Refused(f"{name} of {app} has ended ({record.state}); see run:list")
        if record.node != self.store.node:
            raise Refused(f"{name} of {app} runs on another node ({record.node}): connect there")
        raise Refused(f"{name} of {app} is not up yet; try again in a moment")

    # -- a process entered into the dyno -------------------------------------------------

    async def enter(self, conn: FrontConnection, request: Enter) -> None:
        """Start the process, hand its stdio to the front, relay the front's signals and
        its end; the client leaving hangs it up."""
        dyno = self.find(request.app, request.dyno)
        log = event_log(__name__, app=request.app, dyno=request.dyno, conn=request.connection)
        try:
            command = (
                subsystem_command(self.config, request.subsystem)
                if request.subsystem
                else request.command
            )
        except SubsystemUnavailable as exc:
            raise Refused(str(exc)) from None
        stdio = Stdio(request.pty, audit_stderr=request.subsystem is not None)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        session = trio.socket.from_stdlib_socket(ours)
        try:
            env = with_terminal(dyno.inside.env, request.pty) | request.env
            try:
                dyno.init.enter(
                    request.pty is not None, dyno.inside.argv(command), env,
                    [*stdio.child, theirs.fileno()],
                )  # fmt: skip
            except OSError:
                raise Refused(f"{request.dyno} of {request.app} has ended") from None
            finally:
                theirs.close()
                stdio.close_child()
            pid = await self._entered(session, request)
            log.info(
                "process entered pid=%s terminal=%s subsystem=%s command=%r",
                pid, request.pty is not None, request.subsystem, request.command,
            )  # fmt: skip
            dyno.sessions += 1
            try:
                await self._attend(conn, request, dyno, stdio, session, log)
            finally:
                dyno.sessions -= 1
        finally:
            session.close()
            stdio.close()

    async def _entered(self, session: trio.socket.SocketType, request: Enter) -> str:
        """The entered process's pid (inside the dyno), or Refused with the init's words."""
        with trio.move_on_after(ANSWER_TIMEOUT):
            answer = (await session.recv(512)).decode(errors="replace")
            word, _, value = answer.partition(" ")
            if word == "pid":
                return value
            if word == "error":
                raise Refused(f"{request.dyno}: {value}")
        raise Refused(f"{request.dyno} of {request.app} has ended")

    async def _attend(
        self,
        conn: FrontConnection,
        request: Enter,
        dyno: RunningDyno,
        stdio: Stdio,
        session: trio.socket.SocketType,
        log: EventLog,
    ) -> None:
        await conn.send(Started(_info(self.store, dyno)), stdio.front)
        # The front's copies are the only ones: its closing them is the client's end
        # (EOF, EPIPE, a terminal's hang-up), as for sshd.
        stdio.close_front()
        stdio.close_kept()
        log_scope = trio.CancelScope()

        async def read_log(fd: int) -> None:
            where = {"app": request.app, "dyno": request.dyno, "conn": request.connection}
            with log_scope:
                await audit_sftp_log(fd, self.audit, log, **where)

        async with trio.open_nursery() as logs:
            if stdio.audit is not None:
                logs.start_soon(read_log, stdio.audit)
            exit = await self._until_exit(conn, session, request.subsystem is not None, log)
            log_scope.deadline = trio.current_time() + LOG_DRAIN
        if exit is None:
            log.info("entered process hung up (client gone)")
            return
        log.info("entered process ended status=%s signal=%s", exit.status, exit.signal)
        with contextlib.suppress(OSError):
            await conn.send(Exited(status=exit.status, signal=exit.signal))

    async def _until_exit(
        self,
        conn: FrontConnection,
        session: trio.socket.SocketType,
        subsystem: bool,
        log: EventLog,
    ) -> Exit | None:
        """How the entered process ended; None when its client left first (it is then
        hung up: the session socket closes)."""
        exit: Exit | None = None
        async with trio.open_nursery() as nursery:

            def deliver(name: str) -> None:
                number = signal.Signals["SIG" + name].value
                with contextlib.suppress(OSError):  # a few bytes: never blocks
                    os.write(session.fileno(), f"s{number}".encode())

            async def follow_front() -> None:
                await conn.relay_signals(log, deliver)
                if subsystem:
                    # Its input has ended: sftp-server logs its open files and exits.
                    await trio.sleep(SUBSYSTEM_GRACE)
                nursery.cancel_scope.cancel()

            nursery.start_soon(follow_front)
            answer = await session.recv(512)
            word, _, value = answer.decode(errors="replace").partition(" ")
            if word == "exit" and value.isdigit():
                exit = Exit.from_returncode(os.waitstatus_to_exitcode(int(value)))
            else:  # the init is gone, the dyno with it
                exit = Exit(status=None, signal="KILL")
            nursery.cancel_scope.cancel()
        return exit

    # -- a connection inside the dyno's network ------------------------------------------

    async def forward(self, conn: FrontConnection, request: Forward) -> None:
        """Connect inside the dyno, hand the socket to the front, and tell it when the dyno
        ends (or until it closes the conversation: the connection is over)."""
        dyno = self.find(request.app, request.dyno)
        log = event_log(__name__, app=request.app, dyno=request.dyno, conn=request.connection)
        target = f"{request.address}:{request.port}"
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with trio.socket.from_stdlib_socket(ours) as answers:
            try:
                dyno.init.connect(request.address, request.port, theirs.fileno())
            except OSError:
                raise Refused(f"{request.dyno} of {request.app} has ended") from None
            finally:
                theirs.close()
            data, fds = b"", []
            with trio.move_on_after(ANSWER_TIMEOUT):
                data, anc, _, _ = await answers.recvmsg(512, ANCILLARY_SPACE)
                fds = received_fds(anc)
        try:
            if data != b"ok" or len(fds) != 1:
                why = data.decode(errors="replace").removeprefix("error ") or "no answer"
                log.info("forward failed target=%s error=%s", target, why)
                raise Refused(f"{target} in {request.dyno}: {why}")
            log.info("forward target=%s", target)
            dyno.forwards += 1
            try:
                await conn.send(Forwarded(), fds)
                close_all(fds)
                fds = []
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_end_with_dyno, conn, dyno, nursery.cancel_scope)
                    with contextlib.suppress(RemoteProtocolError):
                        while await conn.receive() is not None:
                            pass
                    nursery.cancel_scope.cancel()
            finally:
                dyno.forwards -= 1
        finally:
            close_all(fds)


async def _end_with_dyno(conn: FrontConnection, dyno: RunningDyno, scope: trio.CancelScope) -> None:
    await dyno.ended.wait()
    with contextlib.suppress(OSError):
        await conn.send(Ended())
    scope.cancel()


def _info(store: Store, dyno: RunningDyno) -> DynoInfo:
    record = store.get_dyno(dyno.spec.app, dyno.spec.name)
    assert record is not None  # a running dyno has its record
    return record.info()
