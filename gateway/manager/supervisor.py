"""The dyno manager: one trio task per dyno, from `run` request to closed record.

Each SSH session opens its own SEQPACKET connection; that connection is the dyno's
control channel and its lifetime is the attachment. When it closes, the client is gone
and the dyno's process group gets SIGHUP, as sshd's sessions do.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import struct
import termios

import trio

from gateway.config import Config
from gateway.core import applog
from gateway.core.applog import LineSplitter
from gateway.core.dyno import Exit, State
from gateway.core.messages import (
    BadMessage,
    Pty,
    RunRequest,
    encode,
    run_request,
    signal_name,
)
from gateway.core.procfile import resolve_command
from gateway.ipc import ANCILLARY_SPACE, RECV_SIZE, ancillary, unpack
from gateway.manager.applog import AppLog
from gateway.manager.sandbox import DynoSpec, Sandbox, Workspace
from gateway.store import Store

log = logging.getLogger("gateway.manager")

# After a detached dyno's process ends, how long its last output may take to reach the log.
DRAIN_AFTER_EXIT = 5


class RunRefused(Exception):
    """A run the manager will not start; the message goes to the client as is."""


class Manager:
    def __init__(self, config: Config, store: Store, sandbox: Sandbox) -> None:
        self.config = config
        self.store = store
        self.sandbox = sandbox
        self.applog = AppLog(store, config.logs.lines_per_app)

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
            self.applog.heroku(dyno.app, dyno.name, applog.state_changed(dyno.state, "crashed"))
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
        record = self.store.create_dyno(
            app.name, command or self.sandbox.shell, app.size, release.version, attached=True
        )
        spec = DynoSpec(
            app=app.name,
            name=record.name,
            command=command,
            config_vars=self.store.get_config(app.name),
            pty=request.pty,
            release_dir=self.config.releases_dir / app.name / f"v{release.version}",
            size=record.size,
        )
        where = f"app={app.name} dyno={record.name} conn={request.connection}"
        log.info("dyno starting %s release=v%d command=%r", where, release.version, record.command)
        self.applog.heroku(app.name, record.name, applog.starting(record.command))
        try:
            workspace = await self.sandbox.prepare(spec)
        except Exception as exc:
            log.error("dyno failed to start %s error=%s", where, exc)
            self.applog.heroku(app.name, record.name, applog.state_changed("starting", "crashed"))
            self.store.end_dyno(app.name, record.name, State.CRASHED, None, None)
            raise RunRefused(f"{record.name} failed to start") from None
        try:
            exit = await self._supervise(sock, spec, workspace, where)
            self.applog.heroku(
                app.name,
                record.name,
                *self.sandbox.end_reason(workspace),
                applog.exited(exit.shell_status),
                applog.state_changed("up", "complete"),
            )
        finally:
            with trio.CancelScope(shield=True):
                await self.sandbox.remove(workspace)
        self.store.end_dyno(app.name, record.name, State.COMPLETE, exit.status, exit.signal)
        log.info("dyno ended %s status=%s signal=%s", where, exit.status, exit.signal)

    async def _supervise(
        self, sock: trio.socket.SocketType, spec: DynoSpec, workspace: Workspace, where: str
    ) -> Exit:
        """Start the process, hand its stdio to the front, and see it to its end."""
        stdio = Stdio(spec.pty)
        try:
            command = self.sandbox.command(spec, workspace)
            process = await trio.lowlevel.open_process(
                command.argv,
                stdin=stdio.child[0],
                stdout=stdio.child[1],
                stderr=stdio.child[2],
                env=command.env,
                cwd=command.cwd,
                start_new_session=spec.pty is None,
            )
        except BaseException:
            stdio.close()
            raise
        stdio.close_child()
        dyno = Dyno(process, spec, stdio)
        try:
            try:
                await _send(sock, encode("started", dyno=spec.name), stdio.front)
            finally:
                stdio.close_front()
            self.store.set_dyno_state(spec.app, spec.name, State.UP)
            self.applog.heroku(spec.app, spec.name, applog.state_changed("starting", "up"))
            log.info("dyno up %s pid=%d", where, process.pid)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._follow_front, sock, dyno, where)
                with trio.move_on_after(self.config.dynos.max_lifetime) as lifetime:
                    await process.wait()
                if lifetime.cancelled_caught:
                    log.info("dyno cycled (max_lifetime) %s", where)
                    self.applog.heroku(spec.app, spec.name, "Cycling")
                    await self._stop(dyno)
                dyno.end_group()
                if dyno.detached:
                    # Let the log take what the dyno printed last (all writers are gone now).
                    with trio.move_on_after(DRAIN_AFTER_EXIT):
                        await dyno.output_done.wait()
                nursery.cancel_scope.cancel()
        except BaseException:
            with trio.CancelScope(shield=True):
                await dyno.stop(grace=1)
            raise
        finally:
            dyno.end_group()
            stdio.close()
        exit = Exit.from_returncode(process.returncode)
        # If the client is gone, the record still says how the dyno ended.
        with contextlib.suppress(OSError):
            await _send(sock, encode("exited", status=exit.status, signal=exit.signal))
        return exit

    async def _stop(self, dyno: Dyno) -> None:
        """SIGTERM, `stop_grace`, then SIGKILL, each step in the app log as Heroku logs it."""
        grace = self.config.dynos.stop_grace
        app, name = dyno.spec.app, dyno.spec.name
        self.applog.heroku(app, name, "Stopping all processes with SIGTERM")
        if not await dyno.stop(grace):
            self.applog.heroku(
                app,
                name,
                "Error R12 (Exit timeout) -> At least one process failed to exit within "
                f"{grace} seconds of SIGTERM",
                "Stopping all processes with SIGKILL",
            )

    async def _follow_front(self, sock: trio.socket.SocketType, dyno: Dyno, where: str) -> None:
        """Relay the front's signal requests. When the front hangs up, so does the dyno: it
        gets SIGHUP, and whatever survives it runs on detached, its output going to the
        app log."""
        while True:
            try:
                data, anc, flags, _ = await sock.recvmsg(RECV_SIZE, ANCILLARY_SPACE)
            except OSError:
                data, anc, flags = b"", [], 0
            if not data:
                log.info("client gone, SIGHUP %s", where)
                dyno.detached = True
                dyno.signal_group(signal.SIGHUP)
                await dyno.capture_output(self.applog)
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


class Stdio:
    """A dyno's standard streams: a PTY, or three pipes. `child` are the dyno's ends,
    `front` go to the SSH front, `kept` stay with the manager (a PTY master, or the
    stdout and stderr read ends) to find the foreground job and to read a detached
    dyno's output."""

    def __init__(self, pty: Pty | None) -> None:
        if pty is not None:
            master, slave = os.openpty()
            _set_winsize(slave, pty.rows, pty.cols)
            self.child, self.front, self.kept = [slave] * 3, [os.dup(master)], [master]
        else:
            in_r, in_w = os.pipe()
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            self.child, self.front = [in_r, out_w, err_w], [in_w, os.dup(out_r), os.dup(err_r)]
            self.kept = [out_r, err_r]

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

    def __init__(self, process: trio.Process, spec: DynoSpec, stdio: Stdio) -> None:
        self.process = process
        self.spec = spec
        self.pgid = process.pid  # a new session: the dyno's process is its group leader
        self.master = stdio.kept[0] if spec.pty is not None else None
        self.outputs = list(stdio.kept)
        self.detached = False
        self.output_done = trio.Event()

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


async def _send(sock: trio.socket.SocketType, data: bytes, fds: list[int] | None = None) -> None:
    await sock.sendmsg([data], ancillary(fds or []))


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
