"""Server channels (sessions, and forwarded TCP connections) that grant the client window
only for data the dyno has taken, and send what one write makes in one transport write.

Window: asyncssh 2.24 sends a window adjust in `_deliver_data` as if nothing were waiting
in its receive buffer: after `pause_reading()`, the next resume grants a full new window
while up to a window's worth is still buffered, and whatever sits above asyncssh (a pipe
writer without backpressure) can make that grow without bound (measured: 266 MB held for
a 200 MB upload). Here buffered bytes count as still outstanding, so what the client may
send plus what we hold never exceeds one window. tests/test_backpressure.py measures it.

Batching: asyncssh writes every packet to the transport on its own (and puts an ignore
packet before each), so a 1 MB read of dyno output became 64 socket sends, each waking
the client. Here the packets of one flush of the send buffer are joined into one write:
the client's CPU per GB halves (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
from typing import Any

import asyncssh
from asyncssh.channel import SSHChannel


class _Collector:
    """Stands in for the transport while a flush runs: keeps what asyncssh writes, and
    passes anything else (close, abort, extra info) to the real transport."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.parts.append(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class _FlowControl(SSHChannel[bytes]):
    def _deliver_data(self, data: bytes, datatype: Any) -> None:
        buffered = sum(len(chunk) for chunk, _ in self._recv_buf)
        # Seen from the parent, the buffered bytes are window the client still has.
        self._recv_window += buffered
        try:
            super()._deliver_data(data, datatype)
        finally:
            self._recv_window -= buffered

    def _flush_send_buf(self) -> None:
        # Every send path (write, window adjust, EOF, close) flushes through here. The
        # flush is synchronous, so nothing else writes to the connection meanwhile and
        # the joined bytes keep their order.
        conn = self._conn
        transport = getattr(conn, "_transport", None)
        if transport is None or isinstance(transport, _Collector):
            super()._flush_send_buf()
            return
        collector = _Collector(transport)
        internals: Any = conn  # asyncssh's connection internals, untyped for this use
        internals._transport = collector
        try:
            super()._flush_send_buf()
        finally:
            # Unless the connection was torn down meanwhile (it then dropped its transport).
            if internals._transport is collector:
                internals._transport = transport
                # As asyncssh's own _send: a ConnectionError means the connection is going.
                if collector.parts:
                    with contextlib.suppress(ConnectionError):
                        transport.write(b"".join(collector.parts))


class FlowControlledChannel(_FlowControl, asyncssh.SSHServerChannel[bytes]):
    """A session channel."""


class FlowControlledTCPChannel(_FlowControl, asyncssh.SSHTCPChannel[bytes]):
    """A forwarded TCP connection's channel (`ssh -L`, `-D`)."""


def adopt(channel: asyncssh.SSHServerChannel[bytes]) -> FlowControlledChannel:
    """Turn the channel asyncssh made into a FlowControlledChannel. asyncssh builds server
    channels from connection internals, so changing the class of the one it made is the
    smallest way in; the subclass adds no state."""
    channel.__class__ = FlowControlledChannel
    assert isinstance(channel, FlowControlledChannel)
    return channel


def adopt_tcp(channel: asyncssh.SSHTCPChannel[bytes]) -> FlowControlledTCPChannel:
    """The same for a forwarded TCP connection's channel."""
    channel.__class__ = FlowControlledTCPChannel
    assert isinstance(channel, FlowControlledTCPChannel)
    return channel
