"""What the front tells operators: the audit trail's connection, authentication and
session events, and Prometheus metrics, served at /metrics with the manager's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable

import h11
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from gateway.audit import AuditLog
from gateway.core.refusals import RefusalDigest
from gateway.front.link import Connector, ManagerLink
from gateway.ipc import ManagerError

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()
CONNECTIONS = Counter(
    "gateway_connections", "SSH connections, by outcome (admitted, refused)", ["outcome"],
    registry=REGISTRY,
)  # fmt: skip
AUTHS = Counter("gateway_auth", "Authentication results", ["result"], registry=REGISTRY)
SESSIONS = Gauge(
    "gateway_sessions_attached", "Attached sessions now", ["app", "size"], registry=REGISTRY
)
SESSIONS_TOTAL = Counter(
    "gateway_sessions", "Attached sessions started", ["app", "size", "via"], registry=REGISTRY
)
BYTES = Counter(
    "gateway_session_bytes", "Bytes moved between clients and dynos", ["direction"],
    registry=REGISTRY,
)  # fmt: skip


FORWARDS = Counter(
    "gateway_forwards", "Forwarded connections into dynos, by outcome (open, refused)",
    ["outcome"], registry=REGISTRY,
)  # fmt: skip
UNAUTHENTICATED = Gauge(
    "gateway_unauthenticated_connections",
    "Connections not yet authenticated, by listener and state (handshake, waiting)",
    ["listener", "state"], registry=REGISTRY,
)  # fmt: skip


class Observer:
    """One per front process: the audit trail and the metrics, behind plain calls."""

    def __init__(self, audit: AuditLog, clock: Callable[[], float] = time.monotonic) -> None:
        self.audit = audit
        self._refusals = RefusalDigest()
        self._clock = clock
        self._flush: asyncio.TimerHandle | None = None

    def connected(self, conn: str, source: str) -> None:
        CONNECTIONS.labels("admitted").inc()
        self.audit.event("connect", conn=conn, source=source)

    def refused(self, listener: str, conn: str, source: str, reason: str, detail: str = "") -> None:
        """A connection refused before authenticating: in the log and the audit trail
        the first of its listener, source and reason per interval, then one summary with
        the count (gateway/core/refusals.py), so a flood cannot grow either without bound."""
        CONNECTIONS.labels("refused").inc()
        now = self._clock()
        self.flush_refusals()
        if self._refusals.refused(listener, source, reason, now):
            log.info(
                "connection refused conn=%s source=%s reason=%s listener=%s%s",
                conn, source, reason, listener, f" {detail}" if detail else "",
            )  # fmt: skip
            self.audit.event(
                "connect_refused", conn=conn, source=source, reason=reason, listener=listener
            )
        self._schedule_flush()

    def flush_refusals(self, force: bool = False) -> None:
        """Write the summaries of a finished interval (`force`: at shutdown, whatever
        the interval)."""
        now = self._clock()
        for summary in self._refusals.flush(now, force):
            seconds = round(now - summary.since)
            log.info(
                "connections refused source=%s reason=%s listener=%s count=%d seconds=%d",
                summary.source, summary.reason, summary.listener, summary.count, seconds,
            )  # fmt: skip
            self.audit.event(
                "connect_refused_summary", source=summary.source, reason=summary.reason,
                listener=summary.listener, count=summary.count, seconds=seconds,
            )  # fmt: skip

    def _schedule_flush(self) -> None:
        due = self._refusals.due()
        if due is None or self._flush is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (tests of the bookkeeping): summaries come with close()
        self._flush = loop.call_later(max(0.0, due - self._clock()), self._flush_due)

    def _flush_due(self) -> None:
        self._flush = None
        self.flush_refusals()
        self._schedule_flush()

    def pending(self, listener: str, active: int, waiting: int) -> None:
        UNAUTHENTICATED.labels(listener, "handshake").set(active)
        UNAUTHENTICATED.labels(listener, "waiting").set(waiting)

    def close(self) -> None:
        """At shutdown: what is left to summarize, then the audit trail is closed."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        self.flush_refusals(force=True)
        self.audit.close()

    def authenticated(self, conn: str, app: str, key: str, source: str, accepted: bool) -> None:
        result = "accepted" if accepted else "refused"
        AUTHS.labels(result).inc()
        self.audit.event("auth", conn=conn, app=app, key=key, source=source, result=result)

    def session(
        self,
        conn: str,
        app: str,
        dyno: str,
        size: str,
        command: str | None,
        tty: bool,
        via: str,
        entered: bool = False,
        subsystem: str | None = None,
    ) -> SessionTrace:
        """An attached session starts: in a new dyno (`session_start`), or a process
        entered into a running one (`exec_start`, ssh APP.run.N)."""
        SESSIONS_TOTAL.labels(app, size, via).inc()
        SESSIONS.labels(app, size).inc()
        self.audit.event(
            "exec_start" if entered else "session_start", conn=conn, app=app, dyno=dyno,
            size=size, command=command, subsystem=subsystem, terminal=tty, via=via,
        )  # fmt: skip
        return SessionTrace(self, conn, app, dyno, size, entered)

    def forward(self, conn: str, app: str, dyno: str, target: str, source: str) -> ForwardTrace:
        """A forwarded connection into a dyno is open (`target`: host:port as the client
        asked; `source`: where the client's end says it came from)."""
        FORWARDS.labels("open").inc()
        self.audit.event("forward", conn=conn, app=app, dyno=dyno, target=target, source=source)
        return ForwardTrace(self, conn, app, dyno, target)

    def forward_refused(
        self, conn: str, app: str, dyno: str | None, target: str, reason: str
    ) -> None:
        FORWARDS.labels("refused").inc()
        self.audit.event(
            "forward_refused", conn=conn, app=app, dyno=dyno, target=target, reason=reason
        )


class ForwardTrace:
    """A forwarded connection from open to close, for its closing audit event."""

    def __init__(self, observer: Observer, conn: str, app: str, dyno: str, target: str) -> None:
        self.observer = observer
        self.conn, self.app, self.dyno, self.target = conn, app, dyno, target
        self.started = time.monotonic()

    def ended(self, bytes_in: int, bytes_out: int) -> None:
        BYTES.labels("in").inc(bytes_in)
        BYTES.labels("out").inc(bytes_out)
        self.observer.audit.event(
            "forward_end", conn=self.conn, app=self.app, dyno=self.dyno, target=self.target,
            bytes_in=bytes_in, bytes_out=bytes_out,
            duration=round(time.monotonic() - self.started, 3),
        )  # fmt: skip


class SessionTrace:
    """An attached session from start to end, for its closing audit event."""

    def __init__(
        self, observer: Observer, conn: str, app: str, dyno: str, size: str, entered: bool
    ) -> None:
        self.observer = observer
        self.conn, self.app, self.dyno, self.size = conn, app, dyno, size
        self.entered = entered
        self.started = time.monotonic()
        self.exit_status: int | None = None
        self.exit_signal: str | None = None
        self._ended = False

    def ended(self, bytes_in: int, bytes_out: int) -> None:
        """Once, whichever way the session ended (exit, disconnect, idle, shutdown)."""
        if self._ended:
            return
        self._ended = True
        SESSIONS.labels(self.app, self.size).dec()
        BYTES.labels("in").inc(bytes_in)
        BYTES.labels("out").inc(bytes_out)
        self.observer.audit.event(
            "exec_end" if self.entered else "session_end", conn=self.conn, app=self.app,
            dyno=self.dyno,
            exit_status=self.exit_status, exit_signal=self.exit_signal,
            disconnected=self.exit_status is None and self.exit_signal is None,
            bytes_in=bytes_in, bytes_out=bytes_out,
            duration=round(time.monotonic() - self.started, 3),
        )  # fmt: skip


async def metrics_text(manager: Connector) -> bytes:
    """The front's metrics and the manager's, as one Prometheus text exposition."""
    text = generate_latest(REGISTRY)
    with contextlib.suppress(ManagerError, OSError):
        async with await ManagerLink.open(manager) as link:
            lines = await link.metrics()
        text += ("\n".join(lines) + "\n").encode() if lines else b""
    return text


async def serve_metrics(sock: socket.socket, manager: Connector) -> asyncio.AbstractServer:
    """GET /metrics on its own (loopback) listener; anything else is 404."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            async with asyncio.timeout(10):
                while (event := conn.next_event()) is h11.NEED_DATA:
                    conn.receive_data(await reader.read(4096))
            if not isinstance(event, h11.Request):
                return
            found = event.method == b"GET" and event.target.split(b"?")[0] == b"/metrics"
            body = await metrics_text(manager) if found else b"not found\n"
            headers = [
                ("content-type", "text/plain; version=0.0.4; charset=utf-8"),
                ("content-length", str(len(body))),
                ("connection", "close"),
            ]
            writer.write(
                conn.send(h11.Response(status_code=200 if found else 404, headers=headers))
            )
            writer.write(conn.send(h11.Data(data=body)))
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
        except (TimeoutError, ConnectionError, h11.ProtocolError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, sock=sock)
