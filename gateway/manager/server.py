"""The dyno manager's socket: one front connection per request, each in a task of its own,
children of `serve`, so nothing the manager started outlives it.

Requests: Run (gateway/manager/supervisor.py sees the dyno through), Stop, Logs,
ListDynos (from the store, the one source of truth about which dynos run), Metrics.
Whatever goes wrong in one connection stays in it: the manager and every other dyno
keep running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket

import trio

from gateway.audit import AuditLog
from gateway.config import Config
from gateway.core.dyno import State
from gateway.core.protocol import (
    Dropped,
    DynoList,
    End,
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
from gateway.ipc import close_all
from gateway.manager import metrics
from gateway.manager.applog import AppLog
from gateway.manager.connection import FrontConnection
from gateway.manager.lifecycle import DynoLife
from gateway.manager.orphans import end_group
from gateway.manager.sandbox import Sandbox
from gateway.manager.supervisor import Refused as RefusedRequest
from gateway.manager.supervisor import Supervisor
from gateway.store import UNAVAILABLE_MESSAGE, Store, StoreUnavailable

log = logging.getLogger(__name__)


class Manager:
    def __init__(self, config: Config, store: Store, sandbox: Sandbox) -> None:
        self.config = config
        self.store = store
        self.sandbox = sandbox
        self.applog = AppLog(store, config.logs.lines_per_app)
        self.audit = AuditLog(config.audit_path)
        self.dynos = Supervisor(config, store, sandbox, self.applog, self.audit)

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
            # A burst of sessions each opens a connection here at once: a short backlog
            # made connects fail (ENOTCONN on the first send) past ~400 concurrent ones.
            listener.listen(socket.SOMAXCONN)
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
        except RefusedRequest as exc:
            log.info("request refused %s reason=%s", _describe(request), exc)
            with contextlib.suppress(OSError, LocalProtocolError):
                await conn.send(Refused(str(exc)))
        except StoreUnavailable as exc:
            log.error("request failed %s error=%s", _describe(request), exc)
            with contextlib.suppress(OSError, LocalProtocolError):
                await conn.send(Refused(UNAVAILABLE_MESSAGE))

    async def stop(self, conn: FrontConnection, request: Stop) -> None:
        """run:stop: the dyno's own task stops it (SIGTERM, grace, SIGKILL); the answer
        comes at once, as `heroku ps:stop` answers."""
        if not self.dynos.stop(request.app, request.dyno):
            raise RefusedRequest(f"no running dyno {request.dyno} on {request.app}; see run:list")
        log.info("stop requested app=%s dyno=%s", request.app, request.dyno)
        self.audit.event("dyno_stop", app=request.app, dyno=request.dyno)
        await conn.send(Stopping(request.dyno))

    async def list_dynos(self, conn: FrontConnection, request: ListDynos) -> None:
        if self.store.get_app(request.app) is None:
            raise RefusedRequest(f"no such app: {request.app}")
        if request.dyno is not None:
            record = self.store.get_dyno(request.app, request.dyno)
            records = [record] if record is not None else []
        else:
            records = self.store.list_dynos(request.app, running=True)
        await conn.send(DynoList(tuple(record.info() for record in records)))

    async def stream_logs(self, conn: FrontConnection, request: Logs) -> None:
        """The app log's last lines, then (with tail) new lines until the reader leaves.
        The history is read and the feed opened with no await between, so no line is
        lost or repeated at the seam."""
        if self.store.get_app(request.app) is None:
            raise RefusedRequest(f"no such app: {request.app}")
        history = self.store.read_log(request.app, request.dyno, request.lines)
        with self.applog.follow(request.app, request.dyno) as feed:
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


def _describe(request: object) -> str:
    return " ".join(
        f"{k}={getattr(request, k)}" for k in ("app", "dyno", "connection") if hasattr(request, k)
    )
