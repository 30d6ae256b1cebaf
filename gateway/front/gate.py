"""Admission control in front of a listener (SSH, rendezvous, API): gateway/core/admission.py
applied to accepted sockets.

The listener's protocol factory is the gate's. A new connection is refused (aborted
before a byte is sent), admitted (handed to the listener's real protocol at once), or
made to wait: nothing is sent to it, and what it sends first (an SSH version line, a TLS
ClientHello, an HTTP request; at most EARLY_BYTES, then reading pauses) is kept for its
protocol, so a waiting connection costs a socket and a few KB, and one that leaves is
noticed and gives up its place. When a slot frees, the fairest waiting connection is
handed over the same way, its early bytes fed to its protocol as the transport would.
The handler calls `Pending.settle()` once the client authenticated or went away; that
frees the slot.

Why here and not in asyncssh: asyncssh starts the SSH version exchange in
`connection_made`, and its login timer in the connection's constructor, so the only way
to spend nothing on a waiting connection is to not create its SSH connection until a
slot is free (`ssh.start_ssh`). The TLS handshake, likewise, starts only on hand-over.

Behind HAProxy (`proxy_protocol = true` in the listener's table), a connection is first
made to show its PROXY protocol v2 header (gateway/core/proxy_protocol.py), within
PROXY_HEADER_TIMEOUT: the client address it carries is the connection's source for
everything that follows (admission, penalties, audit, logs). Without a valid header the
connection is closed before it counts anywhere.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from asyncio import sslproto
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.config import SSHSettings
from gateway.core.admission import (
    DISPLACED,
    WAIT_TIMEOUT,
    Admission,
    AdmissionLimits,
    NetblockSize,
    canonical_address,
    startup_slots,
)
from gateway.core.proxy_protocol import BadProxyHeader
from gateway.core.proxy_protocol import parse as parse_proxy_header
from gateway.front.observe import Observer

log = logging.getLogger("gateway.front")

_ids = itertools.count(1)


def connection_id() -> str:
    """Short, unique within this front process, and unguessable across restarts."""
    return f"{os.getpid():x}.{next(_ids)}"


def admission_limits(settings: SSHSettings) -> AdmissionLimits:
    """The admission rules of one listener, from the [ssh] settings (the rendezvous and
    API listeners have the same, each its own slots and waiting room)."""
    return AdmissionLimits(
        slots=startup_slots(settings.max_startups),
        per_source=settings.per_source_max_startups,
        per_netblock=settings.per_netblock_max_startups,
        waiting=settings.max_waiting,
        per_netblock_pending=settings.per_netblock_max_pending,
        wait_time=settings.login_grace_time,
        netblock=NetblockSize.parse(settings.per_source_netblock_size),
    )


@dataclass
class Pending:
    """An admitted connection that has not authenticated yet: its handler calls
    `settle()` when it has (or when it goes away; more calls do nothing)."""

    conn: str
    source: str
    peer: tuple[Any, ...]
    waited: float
    _settle: Callable[[str], None] | None = field(repr=False)

    def settle(self) -> None:
        if self._settle is not None:
            settle, self._settle = self._settle, None
            settle(self.conn)


# `start(transport, pending, early)`: make the listener's protocol the transport's, give
# it `early` (bytes read while waiting, see `feed`) and resume reading.
Start = Callable[[asyncio.Transport, Pending, bytes], None]


def feed(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Give `protocol` bytes read before it took over its transport, as the transport
    would have (a BufferedProtocol, such as TLS's, through its own buffer)."""
    if isinstance(protocol, asyncio.BufferedProtocol):
        view = memoryview(data)
        while view:
            buffer = memoryview(protocol.get_buffer(len(view)))
            size = min(len(buffer), len(view))
            buffer[:size] = view[:size]
            protocol.buffer_updated(size)
            view = view[size:]
    elif data:
        assert isinstance(protocol, asyncio.Protocol)
        protocol.data_received(data)


class Gate:
    """One listener's admission: the pure rules plus the sockets, timers and hand-over.
    `start` gives an admitted transport to the listener's protocol; `precheck(source)`
    may refuse a source before it counts (a penalty), with a reason and a detail."""

    def __init__(
        self,
        listener: str,
        limits: AdmissionLimits,
        observer: Observer,
        start: Start,
        precheck: Callable[[str], tuple[str, str] | None] = lambda source: None,
        clock: Callable[[], float] = time.monotonic,
        proxy_protocol: bool = False,
    ) -> None:
        self.listener = listener
        self.proxy_protocol = proxy_protocol
        self.admission = Admission(limits)
        self.observer = observer
        self._start = start
        self._precheck = precheck
        self._clock = clock
        self._waiting: dict[str, _Arrival] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline: float | None = None
        self._to_settle: deque[str] = deque()
        self._settling = False

    def protocol(self) -> asyncio.Protocol:
        """The protocol factory for loop.create_server."""
        return _Arrival(self)

    def close(self) -> None:
        """At shutdown: close the waiting connections (the admitted ones are their
        handlers')."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for conn, arrival in list(self._waiting.items()):
            del self._waiting[conn]
            self.admission.settle(conn)
            arrival.transport.abort()

    # -- events, from _Arrival and Pending -----------------------------------------------

    def _arrived(self, arrival: _Arrival) -> bool:
        """A new connection; whether it waits."""
        refusal = self._precheck(arrival.source)
        if refusal is not None:
            self._refuse(arrival, *refusal)
            return False
        decision = self.admission.arrive(arrival.conn, arrival.source, arrival.arrived)
        if decision.displaced is not None:
            self._drop_waiting(str(decision.displaced), DISPLACED)
        if decision.outcome == "admitted":
            self._hand_over(arrival)
        elif decision.outcome == "waiting":
            self._waiting[arrival.conn] = arrival
            self._schedule()
        else:
            detail = f"active={self.admission.active} waiting={self.admission.waiting}"
            self._refuse(arrival, decision.reason, detail)
        self._report()
        return decision.outcome == "waiting"

    def _settled(self, conn: str) -> None:
        # A hand-over can settle at once (the client already left): queue such settles
        # rather than recurse, however many there are.
        self._to_settle.append(conn)
        if self._settling:
            return
        self._settling = True
        try:
            while self._to_settle:
                for started in self.admission.settle(self._to_settle.popleft()):
                    self._hand_over(self._waiting.pop(str(started)))
        finally:
            self._settling = False
        self._schedule()
        self._report()

    def _left(self, conn: str) -> None:
        """A waiting connection closed (the client left, or we closed it)."""
        if self._waiting.pop(conn, None) is not None:
            self.admission.settle(conn)
            self._schedule()
            self._report()

    def _expire(self) -> None:
        self._timer = None
        for conn in self.admission.expire(self._clock()):
            self._drop_waiting(str(conn), WAIT_TIMEOUT)
        self._schedule()
        self._report()

    # -- helpers -----------------------------------------------------------------------

    def _hand_over(self, arrival: _Arrival) -> None:
        transport = arrival.transport
        waited = self._clock() - arrival.arrived
        pending = Pending(arrival.conn, arrival.source, arrival.peer, waited, self._settled)
        arrival.handed_over = True
        if transport.is_closing():  # it left (EOF) just now: its close is under way
            pending.settle()
            return
        transport.pause_reading()
        try:
            self._start(transport, pending, bytes(arrival.early))
        except Exception:
            log.exception(
                "%s hand-over failed conn=%s source=%s", self.listener, arrival.conn, arrival.source
            )
            transport.abort()
            pending.settle()

    def _drop_waiting(self, conn: str, reason: str) -> None:
        """Close a waiting connection the rules have let go of (displaced or timed out)."""
        arrival = self._waiting.pop(conn, None)
        if arrival is not None:
            self._refuse(arrival, reason, f"waited={self._clock() - arrival.arrived:.1f}s")

    def _refuse(self, arrival: _Arrival, reason: str, detail: str = "") -> None:
        self.observer.refused(self.listener, arrival.conn, arrival.source, reason, detail)
        arrival.transport.abort()

    def _schedule(self) -> None:
        """One timer, for the longest-waiting connection's deadline."""
        deadline = self.admission.next_deadline()
        if self._timer is not None and deadline != self._timer_deadline:
            self._timer.cancel()
            self._timer = None
        if deadline is not None and self._timer is None:
            delay = max(0.0, deadline - self._clock())
            self._timer = asyncio.get_running_loop().call_later(delay, self._expire)
            self._timer_deadline = deadline

    def _report(self) -> None:
        self.observer.pending(self.listener, self.admission.active, self.admission.waiting)


# What a waiting connection may send before reading pauses: an SSH version line and
# KEXINIT, a TLS ClientHello, an HTTP request head fit; the rest stays in the kernel.
EARLY_BYTES = 4096
# Seconds a connection to a proxy_protocol listener has to send its PROXY header (HAProxy
# sends it at once).
PROXY_HEADER_TIMEOUT = 5


class _Arrival(asyncio.Protocol):
    """A connection's protocol until the gate hands it over (then the real one's)."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.conn = connection_id()
        self.early = bytearray()
        self.handed_over = False
        self.waiting = False
        # Behind a proxy, until its header is read: the bytes so far, and the deadline.
        self._header: bytearray | None = bytearray() if gate.proxy_protocol else None
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = transport.get_extra_info("peername") or ("?", 0)
        self.source = canonical_address(str(self.peer[0]))
        if self._header is not None:
            self._header_timer = asyncio.get_running_loop().call_later(
                PROXY_HEADER_TIMEOUT, self._no_header, "proxy_header_timeout"
            )
            return
        self._arrive()

    def _arrive(self) -> None:
        self.arrived = self.gate._clock()
        self.waiting = self.gate._arrived(self)

    def data_received(self, data: bytes) -> None:
        if self._header is not None:
            self._read_header(data)
            return
        self.early += data
        if len(self.early) >= EARLY_BYTES:
            self.transport.pause_reading()

    def _read_header(self, data: bytes) -> None:
        assert self._header is not None
        self._header += data
        try:
            header = parse_proxy_header(bytes(self._header))
        except BadProxyHeader as exc:
            self._no_header("proxy_header", str(exc))
            return
        if header is None:
            return
        if self._header_timer is not None:
            self._header_timer.cancel()
        # The client's first bytes came with the header: they are its early bytes.
        self.early += self._header[header.length :]
        self._header = None
        if header.source is not None:  # else the proxy speaks for itself (LOCAL)
            self.peer = header.source
            self.source = canonical_address(header.source[0])
        if len(self.early) >= EARLY_BYTES:
            self.transport.pause_reading()
        self._arrive()

    def _no_header(self, reason: str, detail: str = "") -> None:
        """No valid PROXY header: closed, never counted (its source is unknown)."""
        self._header = None
        if self._header_timer is not None:
            self._header_timer.cancel()
        self.gate.observer.refused(self.gate.listener, self.conn, self.source, reason, detail)
        self.transport.abort()

    def eof_received(self) -> bool:
        return False  # the client left while waiting: close, and give up the place

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        # Only before hand-over: a handed-over transport reports to its new protocol.
        if self.waiting and not self.handed_over:
            self.gate._left(self.conn)


# -- hand-overs for the listeners that are not SSH -------------------------------------


def start_tls(
    context: Any, app_protocol: Callable[[Pending], asyncio.Protocol], handshake_timeout: int
) -> Start:
    """Hand an admitted connection to `app_protocol(pending)` behind a TLS server
    handshake (what loop.create_server(ssl=...) does for each accepted connection). A
    failed handshake settles the connection; after it, the app protocol does."""

    def start(transport: asyncio.Transport, pending: Pending, early: bytes) -> None:
        loop = asyncio.get_running_loop()
        handshake = loop.create_future()

        def handshake_done(done: asyncio.Future[None]) -> None:
            # A clean close during the handshake ends it with no exception: the
            # transport's state tells. Settling twice is harmless.
            if done.cancelled() or done.exception() or transport.is_closing():
                pending.settle()

        handshake.add_done_callback(handshake_done)
        tls = sslproto.SSLProtocol(
            loop, app_protocol(pending), context, handshake, server_side=True,
            ssl_handshake_timeout=handshake_timeout,
        )  # fmt: skip
        transport.set_protocol(tls)
        tls.connection_made(transport)
        feed(tls, early)
        transport.resume_reading()

    return start


def start_stream(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter, Pending], Awaitable[None]],
) -> Start:
    """Hand an admitted connection to an asyncio streams handler (as asyncio.start_server
    does); the connection is settled when the handler returns, if not before."""

    def start(transport: asyncio.Transport, pending: Pending, early: bytes) -> None:
        loop = asyncio.get_running_loop()

        async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await handler(reader, writer, pending)
            finally:
                pending.settle()

        protocol = asyncio.StreamReaderProtocol(asyncio.StreamReader(loop=loop), connected)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        feed(protocol, early)
        transport.resume_reading()

    return start
