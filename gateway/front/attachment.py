"""A client attached to a dyno: the pumps between the client's connection (an SSH channel
or a rendezvous TLS stream) and the fds the manager passed for the dyno.

Input that arrives before the dyno is up is held (and the client paused, so it stays
within one window); output is activity for the idle cutoff, and so is input.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import struct
import termios
from collections.abc import Callable
from dataclasses import dataclass

from gateway.front.idle import IdleDeadline
from gateway.front.pumps import InputPump, OutputPump


@dataclass(frozen=True)
class Client:
    """What an attachment needs of the client's connection."""

    write_out: Callable[[bytes], None]
    write_err: Callable[[bytes], None]
    pause_reading: Callable[[], None]
    resume_reading: Callable[[], None]


class Attachment:
    def __init__(self, client: Client, idle_timeout: int, on_idle: Callable[[], None]) -> None:
        self.client = client
        self._idle_timeout = idle_timeout
        self._on_idle = on_idle
        self._idle: IdleDeadline | None = None
        self._early: list[bytes | None] = []
        self._input: InputPump | None = None
        self._outputs: list[OutputPump] = []
        self._owned: list[int] = []
        self._terminal: int | None = None
        self._drained: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def started(self) -> bool:
        return self._input is not None

    @property
    def bytes_in(self) -> int:
        """Bytes from the client to the dyno."""
        return self._input.bytes if self._input is not None else 0

    @property
    def bytes_out(self) -> int:
        """Bytes from the dyno to the client."""
        return sum(pump.bytes for pump in self._outputs)

    # -- client -> dyno ----------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        if self._idle is not None:
            self._idle.touch()
        if self._input is not None:
            self._input.feed(data)
        else:
            self._early.append(data)
            self.client.pause_reading()

    def feed_eof(self) -> None:
        if self._input is not None:
            self._input.feed_eof()
        else:
            self._early.append(None)

    # -- the dyno's streams ------------------------------------------------------------

    def start(self, fds: list[int], pty: bool) -> None:
        """Pump the fds the manager passed: a PTY master; or stdin, stdout and stderr; or
        stdin and one merged output."""
        self._idle = IdleDeadline(self._idle_timeout, self._on_idle)
        client = self.client
        if pty:
            (master,) = fds
            self._owned, self._terminal = [master], master
            self._input = InputPump(master, client.pause_reading, client.resume_reading, False)
            self._outputs = [OutputPump(master, self._out(client.write_out), self._on_eof)]
        else:
            stdin, *outputs = fds
            self._owned = outputs  # the input pump owns stdin
            self._input = InputPump(stdin, client.pause_reading, client.resume_reading, True)
            writers = [client.write_out, client.write_err][: len(outputs)]
            self._outputs = [
                OutputPump(fd, self._out(write), self._on_eof)
                for fd, write in zip(outputs, writers, strict=True)
            ]
        for pump in self._outputs:
            pump.resume()
        early, self._early = self._early, []
        for data in early:
            if data is None:
                self._input.feed_eof()
            else:
                self._input.feed(data)
        if early and not self._input.blocked:
            client.resume_reading()

    def _out(self, write: Callable[[bytes], None]) -> Callable[[bytes], None]:
        def forward(data: bytes) -> None:
            if self._idle is not None:
                self._idle.touch()
            write(data)

        return forward

    def _on_eof(self) -> None:
        if all(pump.eof for pump in self._outputs) and not self._drained.done():
            self._drained.set_result(None)

    async def drained(self) -> None:
        """Until the dyno's output streams reached EOF and all of it went to the client."""
        await self._drained

    def pause_output(self) -> None:
        for pump in self._outputs:
            pump.pause()

    def resume_output(self) -> None:
        for pump in self._outputs:
            pump.resume()

    def resize(self, cols: int, rows: int) -> None:
        """A new terminal size; the kernel sends the foreground job SIGWINCH."""
        if self._terminal is not None:
            fcntl.ioctl(self._terminal, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def close(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self.pause_output()
        if self._input is not None:
            self._input.close()
        for fd in self._owned:
            os.close(fd)
        self._owned = []
        self._terminal = None
