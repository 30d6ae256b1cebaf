"""A server channel that grants the client window only for data the dyno has taken.

asyncssh 2.24 sends a window adjust in `_deliver_data` as if nothing were waiting in its
receive buffer: after `pause_reading()`, the next resume grants a full new window while up
to a window's worth is still buffered, and whatever sits above asyncssh (a pipe writer
without backpressure) can make that grow without bound (measured: 266 MB held for a
200 MB upload). Here buffered bytes count as still outstanding, so what the client may
send plus what we hold never exceeds one window. tests/test_backpressure.py measures it.
"""

from __future__ import annotations

from typing import Any

import asyncssh


class FlowControlledChannel(asyncssh.SSHServerChannel):
    def _deliver_data(self, data: bytes, datatype: Any) -> None:
        buffered = sum(len(chunk) for chunk, _ in self._recv_buf)
        # Seen from the parent, the buffered bytes are window the client still has.
        self._recv_window += buffered
        try:
            super()._deliver_data(data, datatype)
        finally:
            self._recv_window -= buffered


def adopt(channel: asyncssh.SSHServerChannel) -> FlowControlledChannel:
    """Turn the channel asyncssh made into a FlowControlledChannel. asyncssh builds server
    channels from connection internals, so changing the class of the one it made is the
    smallest way in; the subclass adds no state."""
    channel.__class__ = FlowControlledChannel
    return channel  # type: ignore[return-value]
