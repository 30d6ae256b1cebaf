"""Server channels (sessions, and forwarded TCP connections) that grant the client window
only for data the dyno has taken, and send what one write makes in one transport write.

Window: asyncssh 2.24 sends a window adjust in `_deliver_data` as if nothing were waiting
in its receive buffer: after `pause_reading()`, the next resume grants a full new window
while up to a window's worth is still buffered, and whatever sits above asyncssh (a pipe
writer without backpressure) can make that grow without bound (measured: 266 MB held for
a 200 MB upload). Here buffered bytes count as still outstanding, so what the client may
send plus what we hold never exceeds one window. tests/test_backpressure.py measures it.

Batching: asyncssh writes every packet to the transport on its own, so a 1 MB read of
dyno output became 64 socket sends, each waking the client. Here the packets of one
flush of the send buffer are joined into one write: the client's CPU per GB halves
(docs/benchmarks.md).

Fewer copies: asyncssh copies what is written into a bytearray, slices a copy of each
packet's data from it, and joins it twice more (`String`, the channel's header) before
the connection builds the packet. Here the send buffer holds views of the written bytes
and the packet's fields go to the connection as they are: the data is copied once, into
the packet (docs/benchmarks.md: copies were a quarter of the front's CPU on downloads).
"""

from __future__ import annotations

import contextlib
from typing import Any

import asyncssh
from asyncssh.channel import SSHChannel
from asyncssh.constants import MSG_CHANNEL_DATA, MSG_CHANNEL_EXTENDED_DATA
from asyncssh.packet import UInt32


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

    def write(self, data: bytes, datatype: Any = None) -> None:
        # As SSHChannel.write for a channel without encoding, keeping a view of `data`
        # where asyncssh copies it into a bytearray (a copy still, of what could change
        # under the view).
        if self._send_state != "open":
            raise BrokenPipeError("Channel not open for sending")
        if datatype is not None and datatype not in self._write_datatypes:
            raise OSError("Invalid extended data type")
        if not data:
            return
        kept = memoryview(data if isinstance(data, bytes) else bytes(data))
        self._send_buf.append((kept, datatype))  # type: ignore[arg-type]
        self._send_buf_len += len(data)
        self._flush_send_buf()

    def _flush_send_buf(self) -> None:
        # Every send path (write, window adjust, EOF, close) flushes through here. The
        # flush is synchronous, so nothing else writes to the connection meanwhile and
        # the joined bytes keep their order.
        conn = self._conn
        transport = getattr(conn, "_transport", None)
        if transport is None or isinstance(transport, _Collector):
            self._send_data()
            super()._flush_send_buf()
            return
        collector = _Collector(transport)
        internals: Any = conn  # asyncssh's connection internals, untyped for this use
        internals._transport = collector
        try:
            self._send_data()
            # With the data sent, asyncssh's own flush only pauses or resumes the writer
            # and sends an EOF or close that waited for the buffer to empty.
            super()._flush_send_buf()
        finally:
            # Unless the connection was torn down meanwhile (it then dropped its transport).
            if internals._transport is collector:
                internals._transport = transport
                # As asyncssh's own _send: a ConnectionError means the connection is going.
                if collector.parts:
                    with contextlib.suppress(ConnectionError):
                        transport.write(b"".join(collector.parts))

    def _send_data(self) -> None:
        """The data packets the client's window allows, as asyncssh's flush sends them,
        from views of the buffer."""
        conn: Any = self._conn
        while self._send_buf and self._send_window:
            size = min(self._send_window, self._send_pktsize)
            buf, datatype = self._send_buf[0]
            data = buf[:size]
            if len(buf) > size:
                self._send_buf[0] = (buf[size:], datatype)
            else:
                del self._send_buf[0]
            self._send_buf_len -= len(data)
            self._send_window -= len(data)
            if self._send_chan is None:  # as SSHChannel.send_packet: nowhere to send it
                continue
            fields = (UInt32(self._send_chan),) if datatype is None else (
                UInt32(self._send_chan), UInt32(datatype))  # fmt: skip
            kind = MSG_CHANNEL_DATA if datatype is None else MSG_CHANNEL_EXTENDED_DATA
            conn.send_packet(kind, *fields, UInt32(len(data)), data, handler=self)


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
