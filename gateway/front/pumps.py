"""Copy loops between an SSH channel and a dyno's file descriptors.

Written here rather than using asyncssh's redirect(), which loses data on pipes, forwards
no signals, and hides the bytes from the idle timer. Both directions apply backpressure:
output is read only while the channel accepts it, input is taken from the channel only
as fast as the dyno reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
from collections.abc import Callable

# One read drains a full pipe (below): one channel flush, one socket write per MB. What
# the client's window does not take yet waits in the channel, which pauses the pump past
# its high-water mark, so a busy output holds at most about READ_SIZE plus one window.
READ_SIZE = 1024 * 1024
# A dyno's pipes hold 64 KB by default: a fast writer fills one between two of our reads
# and sleeps, so each read returns 64 KB and costs both sides a wakeup. 1 MB (Linux's
# default most for an unprivileged process) lets the writer run ahead and reads fill.
PIPE_SIZE = 1024 * 1024
# Pieces per writev (Linux's IOV_MAX is 1024).
WRITEV_MAX = 512


def _grow_pipe(fd: int) -> None:
    """Make the pipe behind `fd` hold PIPE_SIZE bytes; nothing for a PTY or a socket."""
    if hasattr(fcntl, "F_SETPIPE_SZ"):
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


class OutputPump:
    """Reads a dyno's stdout, stderr or PTY master into `write` until EOF."""

    def __init__(self, fd: int, write: Callable[[bytes], None], on_eof: Callable[[], None]) -> None:
        self.fd = fd
        self._write = write
        self._on_eof = on_eof
        self._loop = asyncio.get_running_loop()
        self._reading = False
        self.eof = False
        self.bytes = 0
        os.set_blocking(fd, False)
        _grow_pipe(fd)

    def resume(self) -> None:
        if not self._reading and not self.eof:
            self._loop.add_reader(self.fd, self._readable)
            self._reading = True

    def pause(self) -> None:
        if self._reading:
            self._loop.remove_reader(self.fd)
            self._reading = False

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            # EIO on a PTY master: every slave fd is closed, the terminal has hung up; a
            # forwarded connection's socket ends with a reset or a timeout.
            if exc.errno not in (errno.EIO, errno.ECONNRESET, errno.ETIMEDOUT):
                raise
            data = b""
        if data:
            self.bytes += len(data)
            self._write(data)
            return
        self.pause()
        self.eof = True
        self._on_eof()


class InputPump:
    """Writes channel data into a dyno's stdin (or PTY master, or a forwarded connection's
    socket), pausing the channel while the dyno is not reading. At the end of the input,
    once all of it is written, it closes `fd` (`close_on_eof`) and calls `finished`.

    What arrives during one turn of the event loop (the packets of one socket read, up
    to 256 KB) goes to the dyno in one write at the end of that turn, not a write per
    packet: each write wakes the dyno's reader, and on uploads those wake-ups were a
    tenth of the front's CPU (docs/benchmarks.md). The pieces are written as they are
    (writev), not joined."""

    def __init__(
        self,
        fd: int,
        pause: Callable[[], None],
        resume: Callable[[], None],
        close_on_eof: bool,
        finished: Callable[[], None] | None = None,
    ) -> None:
        self.fd = fd
        self._pause = pause
        self._resume = resume
        self._close_on_eof = close_on_eof
        self._finished = finished
        self._loop = asyncio.get_running_loop()
        self._pending: list[memoryview] = []
        self._scheduled = False  # a write is due at the end of this turn of the loop
        self._waiting = False  # the dyno is not reading: the channel is paused
        self._eof = False
        self._broken = False
        self.closed = False
        self.bytes = 0
        os.set_blocking(fd, False)
        _grow_pipe(fd)

    @property
    def blocked(self) -> bool:
        """Whether input waits for the dyno to read (the channel is paused)."""
        return self._waiting

    def feed(self, data: bytes) -> None:
        self.bytes += len(data)
        if self._broken or self.closed or not data:
            return  # the dyno closed its stdin; like sshd, discard what the client sends
        self._pending.append(memoryview(data))
        if not self._scheduled and not self._waiting:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def feed_eof(self) -> None:
        self._eof = True
        if not self._pending and not self._scheduled and not self._waiting:
            self._finish()

    def _flush(self) -> None:
        self._scheduled = False
        if self.closed:
            return
        self._write_pending()
        if self._pending:
            self._waiting = True
            self._pause()
            self._loop.add_writer(self.fd, self._writable)
        elif self._eof:
            self._finish()

    def _write_pending(self) -> None:
        """Write what the fd takes now; keep the rest."""
        pending = self._pending
        while pending:
            try:
                written = os.writev(self.fd, pending[:WRITEV_MAX])
            except BlockingIOError:
                return
            except OSError:  # the dyno closed its stdin (EPIPE), or its terminal went
                self._broken = True
                pending.clear()
                return
            if not written:
                return
            while pending and written >= len(pending[0]):
                written -= len(pending.pop(0))
            if written:
                pending[0] = pending[0][written:]
                return  # a short write: the fd is full

    def _writable(self) -> None:
        self._write_pending()
        if not self._pending:
            self._loop.remove_writer(self.fd)
            self._waiting = False
            if self._eof:
                self._finish()
            self._resume()

    def _finish(self) -> None:
        if self._close_on_eof and not self.closed:
            self.close()
        if self._finished is not None:
            self._finished()

    def close(self) -> None:
        """Stop writing; closes the fd when it is ours alone (not a PTY master)."""
        if self._waiting:
            self._loop.remove_writer(self.fd)
            self._waiting = False
        self._pending.clear()
        if self._close_on_eof and not self.closed:
            os.close(self.fd)
        self.closed = True
