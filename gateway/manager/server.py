"""The dyno manager's socket: one front connection per request, each in a task of its own,
children of `serve`, so nothing the manager started outlives it.

Requests: Run (gateway/manager/supervisor.py sees the dyno through), Enter and Forward
(into a running dyno: gateway/manager/entry.py), Stop (of a dyno on another node: sent
there, gateway/manager/cluster.py), Logs, ListDynos (from the store,
the one source of truth about which dynos run), Metrics, and what the front cannot do
itself since it holds no database: CheckKey, Authorize, and FrontHello (its listeners
and keys, gateway/manager/front.py).
Whatever goes wrong in one connection stays in it: the manager and every other dyno
keep running.

Connections come from the socket at `[front] socket` (the admin CLI, a front started on
its own; only root, our own user and the front's user are let in: SO_PEERCRED) and from
the broker of a front we started (each packet on it passes one new connection).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import struct

import trio

from gateway.audit import AuditLog
from gateway.config import Config
from gateway.core.dyno import State
from gateway.core.protocol import (
    Authorize,
    Authorized,
    CheckKey,
    Dropped,
    DynoList,
    End,
    Enter,
    Forward,
    FrontHello,
    FrontReady,
    KeyChecked,
    ListDynos,
    LocalProtocolError,
    LogLines,
    Logs,
    Metrics,
    MetricsText,
    ProtocolError,
    Refused,
    Run,
    Stop,
    Stopping,
    batches,
)
from gateway.ipc import ANCILLARY_SPACE, close_all, received_fds
from gateway.manager import metrics
from gateway.manager.applog import AppLog
from gateway.manager.cluster import Cluster
from gateway.manager.connection import FrontConnection
from gateway.manager.entry import DynoEntry
from gateway.manager.front import FrontKit
from gateway.manager.lifecycle import DynoLife
from gateway.manager.orphans import end_group
from gateway.manager.sandbox import Sandbox
from gateway.manager.supervisor import Refused as RefusedRequest
from gateway.manager.supervisor import Supervisor
from gateway.privileges import FrontUser
from gateway.store import UNAVAILABLE_MESSAGE, Store, StoreUnavailable

log = logging.getLogger(__name__)


class Manager:
    def __init__(
        self,
        config: Config,
        store: Store,
        sandbox: Sandbox,
        kit: FrontKit,
        front_user: FrontUser | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.sandbox = sandbox
        self.kit = kit
        self.front_user = front_user
        self.applog = AppLog(store, config.logs)
        self.audit = AuditLog(config.audit_path)
        self.dynos = Supervisor(config, store, sandbox, self.applog, self.audit)
        self.cluster = Cluster(config, store, self.dynos, self.applog, self.audit)
        # Set while a front that has its kit says it accepts connections.
        self.front_ready = trio.Event()
        self._front_attached = False
        self._nursery: trio.Nursery | None = None
        self.entry = DynoEntry(config, store, self.dynos, self.audit)

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
            if self.front_user is not None and not self.config.front.spawn:
                # A front started on its own connects here as its user.
                os.chown(path, self.front_user.uid, self.front_user.gid)
            # A burst of sessions each opens a connection here at once: a short backlog
            # made connects fail (ENOTCONN on the first send) past ~400 concurrent ones.
            listener.listen(socket.SOMAXCONN)
            self.recover()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                while True:
                    sock, _ = await listener.accept()
                    if self._admitted(sock):
                        nursery.start_soon(self.handle, sock)
                    else:
                        sock.close()

    def _admitted(self, sock: trio.socket.SocketType) -> bool:
        """Only root, our own user and the front's may talk to us; anyone else is
        refused and logged (the socket's mode should have stopped them already)."""
        pid, uid, _ = peer_credentials(sock)
        allowed = {0, os.geteuid()}
        if self.front_user is not None:
            allowed.add(self.front_user.uid)
        if uid in allowed:
            return True
        log.warning("manager connection refused uid=%d pid=%d", uid, pid)
        return False

    async def serve_broker(self, broker: trio.socket.SocketType) -> None:
        """The connections a front we started opens: each packet on its broker passes
        one end of a new SEQPACKET socket pair, served like an accepted connection."""
        assert self._nursery is not None, "serve() first"
        while True:
            try:
                data, anc, _, _ = await broker.recvmsg(1, ANCILLARY_SPACE)
            except OSError:
                return
            fds = received_fds(anc)
            if not data and not fds:
                return  # the front is gone
            for fd in fds:
                sock = socket.socket(fileno=fd)
                if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
                    log.warning("front broker: passed a descriptor that is not a connection")
                    sock.close()
                    continue
                self._nursery.start_soon(self.handle, trio.socket.from_stdlib_socket(sock))

    def recover(self) -> None:
        """Close the records of dynos a previous manager left running (it died with them:
        every dyno dies with its supervisor) and remove their directories."""
        # With a shared database, only this node's: the others' dynos are theirs to close.
        # A SQLite database is this host's alone, whatever its name was before.
        node = self.store.node if self.store.shared else None
        for dyno in self.store.list_dynos(running=True, node=node):
            if dyno.pid is not None and end_group(dyno.pid, dyno.pid_started):
                log.warning("ended orphaned processes app=%s dyno=%s", dyno.app, dyno.name)
            life = DynoLife(
                self.store, self.applog, self.audit, dyno.app, dyno.name, dyno.size,
                State(dyno.state),
            )  # fmt: skip
            life.crash()
            log.warning(
                "dyno closed after restart app=%s dyno=%s state=crashed", dyno.app, dyno.name
            )
        self.sandbox.remove_leftovers()

    async def stop_all(self) -> None:
        await self.dynos.stop_all()

    async def handle(self, sock: trio.socket.SocketType) -> None:
        """One front connection: one request and what follows from it."""
        with sock:
            conn = FrontConnection(sock)
            try:
                await self._answer(conn)
            except* OSError as group:
                log.info("front connection ended: %s", group.exceptions[0])
            except* ProtocolError as group:
                log.warning("bad request from the front: %s", group.exceptions[0])
            except* Exception:
                log.exception("front connection failed")

    async def _answer(self, conn: FrontConnection) -> None:
        received = await conn.receive()
        if received is None:
            return
        request, fds = received
        close_all(fds)  # the front never passes descriptors to us
        try:
            if isinstance(request, Run):
                await self.dynos.run(conn, request)
            elif isinstance(request, Enter):
                await self.entry.enter(conn, request)
            elif isinstance(request, Forward):
                await self.entry.forward(conn, request)
            elif isinstance(request, Stop):
                await self.stop(conn, request)
            elif isinstance(request, Logs):
                await self.stream_logs(conn, request)
            elif isinstance(request, ListDynos):
                await self.list_dynos(conn, request)
            elif isinstance(request, Metrics):
                for part in batches(metrics.exposition().splitlines()):
                    await conn.send(MetricsText(part))
                await conn.send(End())
            elif isinstance(request, CheckKey):
                allowed = self.store.has_key(request.app, request.fingerprint)
                await conn.send(KeyChecked(allowed))
            elif isinstance(request, Authorize):
                await conn.send(self.authorize(request))
            elif isinstance(request, FrontHello):
                await self.set_up_front(conn)
        except RefusedRequest as exc:
            log.info("request refused %s reason=%s", _describe(request), exc)
            with contextlib.suppress(OSError, LocalProtocolError):
                await conn.send(Refused(str(exc)))
        except StoreUnavailable as exc:
            log.error("request failed %s error=%s", _describe(request), exc)
            with contextlib.suppress(OSError, LocalProtocolError):
                await conn.send(Refused(UNAVAILABLE_MESSAGE))

    def authorize(self, request: Authorize) -> Authorized:
        """A Platform API token's apps, and when the app asked about was made if the
        token may use it (the front answers 404 alike for absent and forbidden apps)."""
        apps = self.store.token_apps(request.token)
        if apps is None:
            return Authorized(valid=False)
        created = None
        if request.app is not None and request.app in apps:
            app = self.store.get_app(request.app)
            created = app.created_at if app is not None else None
        return Authorized(valid=True, apps=tuple(apps), app_created_at=created)

    async def set_up_front(self, conn: FrontConnection) -> None:
        """Hand the front its kit; then its connection is its lifeline: when it closes,
        the front is gone (one started on its own may come back; ours ends the gateway)."""
        if self._front_attached:
            raise RefusedRequest("a front is already attached to this manager")
        pid, uid, _ = peer_credentials(conn.sock)
        self._front_attached = True
        try:
            message, fds = self.kit.setup()
            try:
                await conn.send(message, fds)
            finally:
                os.close(fds[0])  # our copy of the audit trail's new descriptor
            received = await conn.receive()
            if received is None:
                log.warning("SSH front left before it was ready pid=%d", pid)
                return
            close_all(received[1])
            assert isinstance(received[0], FrontReady)  # the conversation allows nothing else
            log.info("SSH front ready pid=%d uid=%d", pid, uid)
            self.front_ready.set()
            while (received := await conn.receive()) is not None:
                close_all(received[1])
            log.info("SSH front gone pid=%d", pid)
        finally:
            self._front_attached = False
            if self.front_ready.is_set():
                self.front_ready = trio.Event()

    async def stop(self, conn: FrontConnection, request: Stop) -> None:
        """run:stop: the dyno's own task stops it (SIGTERM, grace, SIGKILL); the answer
        comes at once, as `heroku ps:stop` answers."""
        if self.dynos.stop(request.app, request.dyno):
            log.info("stop requested app=%s dyno=%s", request.app, request.dyno)
            self.audit.event("dyno_stop", app=request.app, dyno=request.dyno)
        elif node := self.cluster.stop_elsewhere(request.app, request.dyno):
            log.info("stop sent app=%s dyno=%s node=%s", request.app, request.dyno, node)
            self.audit.event("dyno_stop", app=request.app, dyno=request.dyno, node=node)
        else:
            raise RefusedRequest(f"no running dyno {request.dyno} on {request.app}; see run:list")
        await conn.send(Stopping(request.dyno))

    async def list_dynos(self, conn: FrontConnection, request: ListDynos) -> None:
        if self.store.get_app(request.app) is None:
            raise RefusedRequest(f"no such app: {request.app}")
        if request.dyno is not None:
            record = self.store.get_dyno(request.app, request.dyno)
            records = [record] if record is not None else []
        else:
            records = self.store.list_dynos(request.app, running=True)
        infos = []
        for record in records:
            info = record.info()
            # How many are inside it now: this node's own dynos (only these can be entered).
            if (running := self.dynos.running.get((record.app, record.name))) is not None:
                info = dataclasses.replace(
                    info, sessions=running.sessions, forwards=running.forwards
                )
            infos.append(info)
        await conn.send(DynoList(tuple(infos)))

    async def stream_logs(self, conn: FrontConnection, request: Logs) -> None:
        """The app log's last lines, then (with tail) new lines until the reader leaves.
        The history is read and the feed opened with no await between, so no line is
        lost or repeated at the seam."""
        if self.store.get_app(request.app) is None:
            raise RefusedRequest(f"no such app: {request.app}")
        history = self.store.read_log(request.app, request.dyno, request.lines)
        seen = frozenset(line.id for line in history if line.id is not None)
        with self.applog.follow(request.app, request.dyno, seen) as feed:
            for batch in batches([line.format() for line in history]):
                await conn.send(LogLines(batch))
            if not request.tail:
                await conn.send(End())
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on_close, conn, nursery.cancel_scope)
                while True:
                    lines = [await feed.receive.receive()]
                    while len(lines) < 200:
                        try:
                            lines.append(feed.receive.receive_nowait())
                        except trio.WouldBlock:
                            break
                    if dropped := feed.take_dropped():
                        await conn.send(Dropped(dropped))
                    await conn.send(LogLines(tuple(line.format() for line in lines)))


async def _cancel_on_close(conn: FrontConnection, scope: trio.CancelScope) -> None:
    """A log reader's only message is its leaving: a closed connection."""
    with contextlib.suppress(OSError, ProtocolError):
        while await conn.receive() is not None:
            pass
    scope.cancel()


def peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int, int]:
    """The pid, uid and gid of the process at the other end of a Unix socket (as they
    were when it connected, or made the socket pair)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def _describe(request: object) -> str:
    return " ".join(
        f"{k}={getattr(request, k)}" for k in ("app", "dyno", "connection") if hasattr(request, k)
    )
