"""The dyno manager: one trio task per dyno, from `run` request to closed record.

Each SSH session opens its own SEQPACKET connection; that connection is the dyno's
control channel and its lifetime is the attachment. When it closes, the client is gone
and the dyno's process group gets SIGHUP, as sshd's sessions do.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import struct
import termios

import trio

from gateway.config import Config
from gateway.core.dyno import Exit, State
from gateway.core.messages import BadMessage, RunRequest, encode, run_request, signal_name
from gateway.core.procfile import resolve_command
from gateway.ipc import ANCILLARY_SPACE, RECV_SIZE, ancillary, unpack
from gateway.manager.sandbox import DynoSpec, ProcessSandbox, Workspace
from gateway.store import Store

log = logging.getLogger("gateway.manager")


class RunRefused(Exception):
    """A run the manager will not start; the message goes to the client as is."""


class Manager:
    def __init__(self, config: Config, store: Store, sandbox: ProcessSandbox) -> None:
        self.config = config
        self.store = store
        self.sandbox = sandbox

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept front connections until cancelled; every dyno task is a child of this one,
        so no dyno outlives the manager."""
        path = self.config.manager_socket
        if len(os.fsencode(path)) >= 108:
            raise SystemExit(f"state_dir is too deep for a Unix socket path: {path}")
        listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_SEQPACKET)
        with listener:
            path.unlink(missing_ok=True)
            await listener.bind(str(path))
            os.chmod(path, 0o600)
            listener.listen(128)
            self.recover()
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    sock, _ = await listener.accept()
                    nursery.start_soon(self.handle, sock)

    def recover(self) -> None:
        """Close the records of dynos a previous manager left running (it died with them:
        every dyno dies with its supervisor) and remove their directories."""
        for dyno in self.store.list_dynos(running=True):
            self.store.end_dyno(dyno.app, dyno.name, State.CRASHED, None, None)
            log.warning(
                "dyno closed after restart app=%s dyno=%s state=crashed", dyno.app, dyno.name
            )
        self.sandbox.remove_leftovers()

    async def handle(self, sock: trio.socket.SocketType) -> None:
        with sock:
            try:
                data, anc, flags, _ = await sock.recvmsg(RECV_SIZE, ANCILLARY_SPACE)
                message, fds = unpack(data, anc, flags)
                for fd in fds:  # the front never passes descriptors to us
                    os.close(fd)
                if message["type"] != "run":
                    raise BadMessage(f"unexpected {message['type']!r} message")
                request = run_request(message)
            except (BadMessage, OSError) as exc:
                log.warning("bad request from the front: %s", exc)
                return
            try:
                await self.run(sock, request)
            except RunRefused as exc:
                log.info(
                    "run refused app=%s conn=%s reason=%s", request.app, request.connection, exc
                )
                await _send(sock, encode("error", message=str(exc)))

    async def run(self, sock: trio.socket.SocketType, request: RunRequest) -> None:
        app = self.store.get_app(request.app)
        if app is None:
            raise RunRefused(f"no such app: {request.app}")
        release = self.store.latest_release(app.name)
        if release is None:
            raise RunRefused(
                f"app {app.name} has no release yet: "
                f"create one with `gateway releases:create {app.name} SLUG.tgz`"
            )
        command = resolve_command(request.command, release.procfile) if request.command else None
        dyno = self.store.create_dyno(
            app.name, command or self.sandbox.shell, app.size, release.version, attached=True
        )
        spec = DynoSpec(
            app=app.name,
            name=dyno.name,
            command=command,
            config_vars=self.store.get_config(app.name),
            pty=request.pty,
            release_dir=self.config.releases_dir / app.name / f"v{release.version}",
        )
        where = f"app={app.name} dyno={dyno.name} conn={request.connection}"
        log.info("dyno starting %s release=v%d command=%r", where, release.version, dyno.command)
        try:
            workspace = await self.sandbox.prepare(spec)
        except Exception as exc:
            log.error("dyno failed to start %s error=%s", where, exc)
            self.store.end_dyno(app.name, dyno.name, State.CRASHED, None, None)
            raise RunRefused(f"{dyno.name} failed to start") from None
        try:
            exit = await self._supervise(sock, spec, workspace, where)
        finally:
            with trio.CancelScope(shield=True):
                await self.sandbox.remove(workspace)
        self.store.end_dyno(app.name, dyno.name, State.COMPLETE, exit.status, exit.signal)
        log.info("dyno ended %s status=%s signal=%s", where, exit.status, exit.signal)

    async def _supervise(
        self, sock: trio.socket.SocketType, spec: DynoSpec, workspace: Workspace, where: str
    ) -> Exit:
        """Start the process, hand its stdio to the front, and see it to its end."""
        if spec.pty is not None:
            master, slave = os.openpty()
            _set_winsize(slave, spec.pty.rows, spec.pty.cols)
            child_fds, front_fds, keep = (slave, slave, slave), [master], master
        else:
            in_r, in_w = os.pipe()
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            child_fds, front_fds, keep = (in_r, out_w, err_w), [in_w, out_r, err_r], None
        try:
            process = await trio.lowlevel.open_process(
                self.sandbox.argv(spec),
                stdin=child_fds[0],
                stdout=child_fds[1],
                stderr=child_fds[2],
                env=self.sandbox.env(spec, workspace),
                cwd=workspace.app,
                start_new_session=spec.pty is None,
            )
        except BaseException:
            for fd in {*child_fds, *front_fds}:
                os.close(fd)
            raise
        for fd in set(child_fds):
            os.close(fd)
        dyno = Dyno(process, keep)
        try:
            try:
                await _send(sock, encode("started", dyno=spec.name), front_fds)
            finally:
                for fd in front_fds:
                    if fd != keep:
                        os.close(fd)
            self.store.set_dyno_state(spec.app, spec.name, State.UP)
            log.info("dyno up %s pid=%d", where, process.pid)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._follow_front, sock, dyno, where)
                with trio.move_on_after(self.config.dynos.max_lifetime) as lifetime:
                    await process.wait()
                if lifetime.cancelled_caught:
                    log.info("dyno cycled (max_lifetime) %s", where)
                    await dyno.stop(self.config.dynos.stop_grace)
                nursery.cancel_scope.cancel()
        except BaseException:
            with trio.CancelScope(shield=True):
                await dyno.stop(grace=1)
            raise
        finally:
            dyno.end_group()
            if keep is not None:
                os.close(keep)
        exit = Exit.from_returncode(process.returncode)
        # If the client is gone, the record still says how the dyno ended.
        with contextlib.suppress(OSError):
            await _send(sock, encode("exited", status=exit.status, signal=exit.signal))
        return exit

    async def _follow_front(self, sock: trio.socket.SocketType, dyno: Dyno, where: str) -> None:
        """Relay the front's signal requests; when the front hangs up, so does the dyno."""
        while True:
            try:
                data, anc, flags, _ = await sock.recvmsg(RECV_SIZE, ANCILLARY_SPACE)
            except OSError:
                data, anc, flags = b"", [], 0
            if not data:
                log.info("client gone, SIGHUP %s", where)
                dyno.signal_group(signal.SIGHUP)
                await dyno.discard_output()
                return
            try:
                message, fds = unpack(data, anc, flags)
                for fd in fds:
                    os.close(fd)
                if message["type"] != "signal":
                    raise BadMessage(f"unexpected {message['type']!r} message")
                name = signal_name(message)
            except BadMessage as exc:
                log.warning("bad message from the front %s: %s", where, exc)
                continue
            log.info("signal %s %s", name, where)
            dyno.signal_foreground(signal.Signals["SIG" + name])


class Dyno:
    """A running dyno's process group, and (for PTY dynos) the manager's copy of the
    PTY master: it names the foreground job for signals and keeps the terminal open."""

    def __init__(self, process: trio.Process, master: int | None) -> None:
        self.process = process
        self.pgid = process.pid  # a new session: the dyno's process is its group leader
        self.master = master

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

    async def stop(self, grace: float) -> None:
        """SIGTERM, `grace` seconds, then SIGKILL: how Heroku stops and cycles dynos."""
        self.signal_group(signal.SIGTERM)
        with trio.move_on_after(grace):
            await self.process.wait()
            return
        self.signal_group(signal.SIGKILL)
        await self.process.wait()

    def end_group(self) -> None:
        """The dyno ends with its process: whatever it left running goes too."""
        self.signal_group(signal.SIGKILL)

    async def discard_output(self) -> None:
        """Read a hung-up PTY so that a process which survived SIGHUP does not block."""
        if self.master is None:
            return
        stream = trio.lowlevel.FdStream(os.dup(self.master))
        async with stream:
            try:
                while await stream.receive_some(65536):
                    pass
            except (trio.BrokenResourceError, OSError) as exc:
                if getattr(exc, "errno", errno.EIO) != errno.EIO:
                    raise


async def _send(sock: trio.socket.SocketType, data: bytes, fds: list[int] | None = None) -> None:
    await sock.sendmsg([data], ancillary(fds or []))


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
