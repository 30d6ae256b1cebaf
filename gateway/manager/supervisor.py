"""The dyno manager: one trio task per dyno, from `run` request to closed record.

Each SSH session opens its own SEQPACKET connection; that connection is the dyno's
control channel and its lifetime is the attachment. When it closes, the client is gone
and the dyno's process group gets SIGHUP, as sshd's sessions do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal

import trio

from gateway.audit import AuditLog
from gateway.config import Config
from gateway.core import applog
from gateway.core.dyno import Exit, State
from gateway.core.messages import (
    BadMessage,
    LogsRequest,
    RunRequest,
    StopRequest,
    batches,
    decode,
    encode,
    logs_request,
    run_request,
    signal_name,
    stop_request,
)
from gateway.core.procfile import resolve_command
from gateway.ipc import ANCILLARY_SPACE, RECV_SIZE, ancillary, unpack
from gateway.manager import metrics
from gateway.manager.applog import AppLog
from gateway.manager.dyno import Dyno, Stdio
from gateway.manager.dyno_init import InitPipes
from gateway.manager.orphans import end_group, start_time
from gateway.manager.sandbox import DynoSpec, Sandbox, Workspace
from gateway.manager.spawn import spawn
from gateway.store import UNAVAILABLE_MESSAGE, DynoLimitReached, Store, StoreUnavailable
from gateway.store import Dyno as DynoRecord

log = logging.getLogger("gateway.manager")

# After a detached dyno's process ends, how long its last output may take to reach the log.
DRAIN_AFTER_EXIT = 5


class Refused(Exception):
    """A request the manager will not carry out; the message goes to the client as is."""


class Manager:
    def __init__(self, config: Config, store: Store, sandbox: Sandbox) -> None:
        self.config = config
        self.store = store
        self.sandbox = sandbox
        self.applog = AppLog(store, config.logs.lines_per_app)
        self.audit = AuditLog(config.audit_path)
        # The dynos this manager supervises, by (app, name); run:stop finds them here.
        self.running: dict[tuple[str, str], Dyno | None] = {}
        self._none_running = trio.Event()
        self._none_running.set()

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
        # With a shared database, only this node's: the others' dynos are theirs to close.
        # A SQLite database is this host's alone, whatever its name was before.
        node = self.store.node if self.store.shared else None
        for dyno in self.store.list_dynos(running=True, node=node):
            if dyno.pid is not None and end_group(dyno.pid, dyno.pid_started):
                log.warning("ended orphaned processes app=%s dyno=%s", dyno.app, dyno.name)
            self._crashed(dyno.app, dyno.name, dyno.size, dyno.state)
            log.warning(
                "dyno closed after restart app=%s dyno=%s state=crashed", dyno.app, dyno.name
            )
        self.sandbox.remove_leftovers()

    async def handle(self, sock: trio.socket.SocketType) -> None:
        """One front connection: one request and what follows from it. Whatever goes
        wrong in it stays in it: the manager and every other dyno keep running."""
        try:
            await self._handle(sock)
        except Exception as exc:
            if _only(exc, OSError):
                log.info("front connection ended: %s", exc)
            else:
                log.exception("front connection failed")

    async def _handle(self, sock: trio.socket.SocketType) -> None:
        with sock:
            try:
                data, anc, flags, _ = await sock.recvmsg(RECV_SIZE, ANCILLARY_SPACE)
                message, fds = unpack(data, anc, flags)
                for fd in fds:  # the front never passes descriptors to us
                    os.close(fd)
                kind = message["type"]
                if kind == "run":
                    request = run_request(message)
                    await self.run(sock, request)
                elif kind == "stop":
                    await self.stop(sock, stop_request(message))
                elif kind == "logs":
                    await self.stream_logs(sock, logs_request(message))
                elif kind == "metrics":
                    for part in batches(metrics.exposition().splitlines()):
                        await _send(sock, encode("metrics", lines=part))
                    await _send(sock, encode("end"))
                else:
                    raise BadMessage(f"unexpected {kind!r} message")
            except (BadMessage, OSError) as exc:
                log.warning("bad request from the front: %s", exc)
            except Refused as exc:
                log.info("request refused %s reason=%s", _describe(message), exc)
                with contextlib.suppress(OSError):
                    await _send(sock, encode("error", message=str(exc)))
            except StoreUnavailable as exc:
                log.error("request failed %s error=%s", _describe(message), exc)
                with contextlib.suppress(OSError):
                    await _send(sock, encode("error", message=UNAVAILABLE_MESSAGE))

    # -- run ---------------------------------------------------------------------------

    def _check_host_limit(self) -> None:
        """max_per_host: this node's own count (max_per_app is the store's, over all
        nodes, in create_dyno)."""
        if len(self.running) >= self.config.dynos.max_per_host:
            raise Refused(
                f"this host already runs {len(self.running)} dynos, the most allowed "
                "(dynos.max_per_host); try again later"
            )

    async def run(self, sock: trio.socket.SocketType, request: RunRequest) -> None:
        app = self.store.get_app(request.app)
        if app is None:
            raise Refused(f"no such app: {request.app}")
        size = request.size or app.size
        if size not in self.config.sizes:
            raise Refused(
                f"unknown dyno size {size!r}: choose one of {', '.join(self.config.sizes)}"
            )
        release = self.store.latest_release(app.name)
        if release is None:
            raise Refused(
                f"app {app.name} has no release yet: "
                f"create one with `gateway releases:create {app.name} SLUG.tgz`"
            )
        self._check_host_limit()
        command = resolve_command(request.command, release.procfile) if request.command else None
        try:
            record = self.store.create_dyno(
                app.name,
                command or self.sandbox.shell,
                size,
                release.version,
                request.attach,
                max_running=self.config.dynos.max_per_app,
            )
        except DynoLimitReached as exc:
            raise Refused(
                f"{app.name} already runs {exc.running} one-off dynos, the most allowed "
                "(dynos.max_per_app); stop one with run:stop"
            ) from None
        key = (app.name, record.name)
        self.running[key] = None  # counted against the limits from now on
        self._none_running = trio.Event()
        try:
            if request.await_attach and not await self._await_client(sock, record):
                return
            await self._run(sock, request, record, release.version)
        finally:
            del self.running[key]
            if not self.running:
                self._none_running.set()

    async def stop_all(self) -> None:
        """At shutdown: stop every dyno still running (SIGTERM, stop_grace, SIGKILL, with
        Heroku's log lines), and wait for them to end."""
        for dyno in self.running.values():
            if dyno is not None:
                if not dyno.detached:
                    # As on a disconnect first, so that what does not trap SIGHUP ends
                    # by it, whichever of the front's hang-up and this comes first.
                    dyno.hang_up()
                dyno.stop_scope.cancel()
        if self.running:
            log.info("stopping %d dynos", len(self.running))
        with trio.move_on_after(self.config.dynos.stop_grace + 5):
            await self._none_running.wait()

    async def _await_client(self, sock: trio.socket.SocketType, record: DynoRecord) -> bool:
        """A dyno made through the API: name it now, start it when its client arrives on
        the rendezvous port. The front gives up after attach_timeout and closes the
        connection; the slack here only guards against a front that never does."""
        app, name = record.app, record.name
        self.applog.heroku(app, name, "Awaiting client")
        await _send(sock, encode("reserved", dyno=name, size=record.size))
        with trio.move_on_after(self.config.rendezvous.attach_timeout + 5):
            with contextlib.suppress(OSError):
                data = await sock.recv(RECV_SIZE)
                with contextlib.suppress(BadMessage):
                    if data and decode(data)["type"] == "attach":
                        return True
        log.info("no client attached app=%s dyno=%s", app, name)
        self.applog.heroku(
            app,
            name,
            "Error R13 (Attach error) -> Failed to attach to process",
            applog.exited(128),
            applog.state_changed("starting", "complete"),
        )
        self._close_record(app, name, record.size, State.COMPLETE, Exit(status=128), "unclaimed")
        return False

    async def _run(
        self, sock: trio.socket.SocketType, request: RunRequest, record: DynoRecord, version: int
    ) -> None:
        request_time = trio.current_time()
        app = record.app
        spec = DynoSpec(
            app=app,
            name=record.name,
            command=record.command if request.command else None,
            config_vars=self.store.get_config(app) | request.env,
            pty=request.pty if request.attach else None,
            release_dir=self.config.releases_dir / app / f"v{version}",
            size=record.size,
        )
        where = f"app={app} dyno={record.name} conn={request.connection}"
        log.info(
            "dyno starting %s release=v%d size=%s attach=%s command=%r",
            where, version, record.size, request.attach, record.command,
        )  # fmt: skip
        self.applog.heroku(app, record.name, applog.starting(record.command))
        try:
            workspace = await self.sandbox.prepare(spec)
        except Exception as exc:
            log.error("dyno failed to start %s error=%s", where, exc)
            self._crashed(app, record.name, record.size, "starting")
            raise Refused(f"{record.name} failed to start") from None
        try:
            await self._supervise(sock, spec, workspace, where, request, request_time)
        finally:
            with trio.CancelScope(shield=True):
                await self.sandbox.remove(workspace)

    def _record_end(
        self, spec: DynoSpec, workspace: Workspace, exit: Exit, result: str, where: str
    ) -> None:
        """Close the dyno's record and log its end, before the client hears of it, so that
        what a client sees next (run:list, logs, usage) already holds it."""
        self.applog.heroku(
            spec.app,
            spec.name,
            *self.sandbox.end_reason(workspace),
            applog.exited(exit.shell_status),
            applog.state_changed("up", "complete"),
        )
        self._close_record(spec.app, spec.name, spec.size, State.COMPLETE, exit, result)
        log.info(
            "dyno ended %s status=%s signal=%s result=%s", where, exit.status, exit.signal, result
        )

    def _close_record(
        self, app: str, name: str, size: str, state: State, exit: Exit, result: str
    ) -> None:
        """Every dyno's end goes through here: the record, the metrics, the audit trail."""
        try:
            self.store.end_dyno(app, name, state, exit.status, exit.signal)
        except StoreUnavailable as exc:
            # Closed as crashed when this node's manager next starts (recover).
            log.error("dyno record left open app=%s dyno=%s error=%s", app, name, exc)
        metrics.DYNO_ENDS.labels(app, size, result).inc()
        self.audit.event(
            "dyno_end", app=app, dyno=name, size=size, result=result,
            exit_status=exit.status, exit_signal=exit.signal,
        )  # fmt: skip

    def _crashed(self, app: str, name: str, size: str, old_state: str) -> None:
        """A dyno that never ran (or whose manager died): crashed, status unknown."""
        self.applog.heroku(app, name, applog.state_changed(old_state, "crashed"))
        self._close_record(app, name, size, State.CRASHED, Exit(), "crashed")

    async def _supervise(
        self,
        sock: trio.socket.SocketType,
        spec: DynoSpec,
        workspace: Workspace,
        where: str,
        request: RunRequest,
        request_time: float,
    ) -> None:
        """Start the process, hand its stdio to the front, and see it to its end."""
        attach = request.attach
        stdio = Stdio(spec.pty, attach, request.merge_output)
        init = InitPipes.open()
        try:
            command = self.sandbox.command(spec, workspace, init)
            try:
                process = spawn(
                    command.argv,
                    stdin=stdio.child[0],
                    stdout=stdio.child[1],
                    stderr=stdio.child[2],
                    env=command.env,
                    cwd=command.cwd,
                    pass_fds=command.pass_fds,
                )
            except OSError as exc:
                log.error("dyno failed to start %s error=%s", where, exc)
                self._crashed(spec.app, spec.name, spec.size, "starting")
                raise Refused(f"{spec.name} failed to start: {exc.strerror}") from None
        except BaseException:
            stdio.close()
            init.close()
            raise
        stdio.close_child()
        init.close_child_ends()
        metrics.DYNO_START_SECONDS.observe(trio.current_time() - request_time)
        metrics.DYNO_STARTS.labels(spec.app, spec.size).inc()
        running = metrics.DYNOS_RUNNING.labels(spec.app, spec.size)
        running.inc()
        self.audit.event("dyno_start", app=spec.app, dyno=spec.name, size=spec.size,
                         command=spec.command, attached=attach, pid=process.pid)  # fmt: skip
        self.store.set_dyno_process(spec.app, spec.name, process.pid, start_time(process.pid) or 0)
        dyno = Dyno(process, spec, stdio, init)
        self.running[(spec.app, spec.name)] = dyno
        result = "exited"
        try:
            # Up before the client hears of it, so what it asks next already says so.
            self.store.set_dyno_state(spec.app, spec.name, State.UP)
            self.applog.heroku(spec.app, spec.name, applog.state_changed("starting", "up"))
            try:
                await _send(sock, encode("started", dyno=spec.name, size=spec.size), stdio.front)
            finally:
                stdio.close_front()
            log.info("dyno up %s pid=%d", where, process.pid)
            async with trio.open_nursery() as nursery:
                if attach:
                    nursery.start_soon(self._follow_front, sock, dyno, where)
                else:
                    dyno.detached = True  # but it ends with its command, as on Heroku
                    nursery.start_soon(dyno.capture_output, self.applog)
                with trio.move_on_after(self.config.dynos.max_lifetime) as lifetime:
                    with dyno.stop_scope:
                        await process.wait()
                if lifetime.cancelled_caught:
                    result = "cycled"
                    log.info("dyno cycled (max_lifetime) %s", where)
                    self.applog.heroku(spec.app, spec.name, "Cycling")
                    await self._stop(dyno)
                elif dyno.stop_scope.cancelled_caught:
                    result = "stopped"
                    log.info("dyno stopped (run:stop) %s", where)
                    await self._stop(dyno)
                dyno.end_group()
                if dyno.detached:
                    # Let the log take what the dyno printed last (all writers are gone now).
                    with trio.move_on_after(DRAIN_AFTER_EXIT):
                        await dyno.output_done.wait()
                nursery.cancel_scope.cancel()
            returncode = dyno.exit_status()
        except BaseException:
            with trio.CancelScope(shield=True):
                await dyno.stop(grace=1)
                exit = Exit.from_returncode(dyno.exit_status())
                self._record_end(spec, workspace, exit, "stopped", where)
            raise
        finally:
            running.dec()
            dyno.end_group()
            stdio.close()
            init.close()
        exit = Exit.from_returncode(returncode)
        self._record_end(spec, workspace, exit, result, where)
        if attach:
            # If the client is gone, the record still says how the dyno ended.
            with contextlib.suppress(OSError):
                await _send(sock, encode("exited", status=exit.status, signal=exit.signal))

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
                dyno.hang_up()
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

    # -- stop --------------------------------------------------------------------------

    async def stop(self, sock: trio.socket.SocketType, request: StopRequest) -> None:
        """run:stop: the dyno's own task stops it (SIGTERM, grace, SIGKILL); the answer
        comes at once, as `heroku ps:stop` answers."""
        dyno = self.running.get((request.app, request.dyno))
        if dyno is None:
            raise Refused(f"no running dyno {request.dyno} on {request.app}; see run:list")
        log.info("stop requested app=%s dyno=%s", request.app, request.dyno)
        self.audit.event("dyno_stop", app=request.app, dyno=request.dyno)
        dyno.stop_scope.cancel()
        await _send(sock, encode("stopping", dyno=request.dyno))

    # -- logs --------------------------------------------------------------------------

    async def stream_logs(self, sock: trio.socket.SocketType, request: LogsRequest) -> None:
        """The app log's last lines, then (with tail) new lines until the reader leaves.
        The history is read and the feed opened with no await between, so no line is
        lost or repeated at the seam."""
        if self.store.get_app(request.app) is None:
            raise Refused(f"no such app: {request.app}")
        history = self.store.read_log(request.app, request.dyno, request.lines)
        with self.applog.follow(request.app, request.dyno) as feed:
            for batch in batches([line.format() for line in history]):
                await _send(sock, encode("log", lines=batch))
            if not request.tail:
                await _send(sock, encode("end"))
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on_close, sock, nursery.cancel_scope)
                while True:
                    lines = [await feed.receive.receive()]
                    while len(lines) < 200:
                        try:
                            lines.append(feed.receive.receive_nowait())
                        except trio.WouldBlock:
                            break
                    if dropped := feed.take_dropped():
                        await _send(sock, encode("dropped", count=dropped))
                    await _send(sock, encode("log", lines=[line.format() for line in lines]))


async def _cancel_on_close(sock: trio.socket.SocketType, scope: trio.CancelScope) -> None:
    """The reader's only message is its leaving: a closed connection."""
    with contextlib.suppress(OSError):
        while await sock.recv(RECV_SIZE):
            pass
    scope.cancel()


def _only(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether `exc` is, or is a group made only of, exceptions of `kind`."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only(inner, kind) for inner in exc.exceptions)
    return isinstance(exc, kind)


def _describe(message: dict[str, object]) -> str:
    return " ".join(
        f"{k}={message[k]}" for k in ("type", "app", "dyno", "connection") if k in message
    )


async def _send(sock: trio.socket.SocketType, data: bytes, fds: list[int] | None = None) -> None:
    await sock.sendmsg([data], ancillary(fds or []))
