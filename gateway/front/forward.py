"""Local port forwarding into a running dyno (`ssh -L PORT:localhost:PORT APP.run.N@HOST`,
and `-D`): each direct-tcpip channel is pumped to a socket the dyno's init connected
inside the dyno's network and the manager passed here. The front never opens a
connection of its own: it only moves bytes between the channel and that socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket

import asyncssh

from gateway.core import protocol as p
from gateway.eventlog import EventLog
from gateway.front.link import Connector, ManagerLink
from gateway.front.observe import ForwardTrace
from gateway.front.pumps import InputPump, OutputPump
from gateway.ipc import ManagerError, ManagerRefused

# How long a connection inside the dyno may take to be accepted (its own loopback).
CONNECT_TIMEOUT = 10.0


class Refusal(Exception):
    """The forward cannot be made; the message is for the client's log."""


async def open_forward(
    manager: Connector,
    request: p.Forward,
    addresses: tuple[str, ...],
    host: str,
) -> tuple[ManagerLink, int]:
    """A connected socket to `request.port` inside the dyno, trying `addresses` in order
    (`localhost`: 127.0.0.1, then ::1), and the link that says when the dyno ends.
    Refusal when none connects."""
    why = "no address"
    for address in addresses:
        try:
            link = await ManagerLink.open(manager)
        except ManagerError:
            raise Refusal("the dyno manager is not available; try again shortly") from None
        try:
            fd = await link.forward(
                p.Forward(request.app, request.dyno, address, request.port, request.connection)
            )
        except ManagerError as exc:
            link.close()
            if isinstance(exc, ManagerRefused):
                raise Refusal(str(exc)) from None
            raise Refusal("the dyno manager is not available; try again shortly") from None
        error = await _connected(fd)
        if error == 0:
            return link, fd
        os.close(fd)
        link.close()
        why = os.strerror(error)
    raise Refusal(f"{host}:{request.port} in {request.dyno}: {why}")


async def _connected(fd: int) -> int:
    """0 once the socket `fd` is connected, else the errno of its failure."""
    loop = asyncio.get_running_loop()
    writable: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not writable.done():
            writable.set_result(None)

    loop.add_writer(fd, wake)
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await writable
    except TimeoutError:
        return errno.ETIMEDOUT
    finally:
        loop.remove_writer(fd)
    with socket.socket(fileno=os.dup(fd)) as sock:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


class ForwardedConnection(asyncssh.SSHTCPSession[bytes]):
    """One forwarded connection: the channel and the socket inside the dyno, pumped both
    ways with backpressure. It closes when both directions have ended, when either side
    goes, or when the dyno ends."""

    def __init__(self, link: ManagerLink, fd: int, trace: ForwardTrace, log: EventLog) -> None:
        self.link = link
        self.fd = fd
        self.trace = trace
        self.log = log
        self._chan: asyncssh.SSHTCPChannel[bytes] | None = None
        self._input: InputPump | None = None
        self._output: OutputPump | None = None
        self._sent_eof = False
        self._got_eof = False
        self._watch: asyncio.Task[None] | None = None
        self._closed = False

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        self._chan = chan
        self._input = InputPump(
            self.fd, chan.pause_reading, chan.resume_reading, False, self._input_done
        )
        self._output = OutputPump(self.fd, chan.write, self._output_done)
        self._output.resume()
        self._watch = asyncio.get_running_loop().create_task(self._until_dyno_ends())

    async def _until_dyno_ends(self) -> None:
        await self.link.until_ended()
        if not self._closed:
            self.log.info("forward closed: the dyno ended")
            if self._chan is not None:
                self._chan.close()

    def data_received(self, data: bytes, _datatype: object) -> None:
        if self._input is not None:
            self._input.feed(data)

    def eof_received(self) -> bool:
        self._got_eof = True
        if self._input is not None:
            self._input.feed_eof()
        return True  # half open: the dyno's side may still send

    def _input_done(self) -> None:
        """The client's data has all reached the dyno, and it said EOF: pass it on."""
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(self.fd)) as sock:
            sock.shutdown(socket.SHUT_WR)
        self._close_when_done()

    def _output_done(self) -> None:
        self._sent_eof = True
        if self._chan is not None:
            self._chan.write_eof()
        self._close_when_done()

    def _close_when_done(self) -> None:
        if self._sent_eof and self._got_eof and self._chan is not None:
            self._chan.close()

    def pause_writing(self) -> None:
        if self._output is not None:
            self._output.pause()

    def resume_writing(self) -> None:
        if self._output is not None:
            self._output.resume()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = True
        if self._watch is not None:
            self._watch.cancel()
        bytes_in = self._input.bytes if self._input is not None else 0
        bytes_out = self._output.bytes if self._output is not None else 0
        if self._output is not None:
            self._output.pause()
        if self._input is not None:
            self._input.close()
        os.close(self.fd)
        self.link.close()
        self.log.info("forward closed bytes_in=%d bytes_out=%d", bytes_in, bytes_out)
        self.trace.ended(bytes_in, bytes_out)
