"""The front's end of one manager connection (a SEQPACKET socket), on asyncio."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

from gateway.core.messages import encode
from gateway.ipc import ANCILLARY_SPACE, RECV_SIZE, unpack


class ManagerUnavailable(Exception):
    """The dyno manager cannot be reached."""


class ManagerLink:
    """One dyno's control channel. Closing it tells the manager the client is gone."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False

    @classmethod
    async def open(cls, path: Path) -> ManagerLink:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, str(path))
        except OSError as exc:
            sock.close()
            raise ManagerUnavailable(str(exc)) from None
        return cls(sock)

    async def send(self, kind: str, **fields: Any) -> None:
        # A SEQPACKET send is all or nothing, so one sock_sendall is one packet.
        await self._loop.sock_sendall(self._sock, encode(kind, **fields))

    async def receive(self) -> tuple[dict[str, Any], list[int]] | None:
        """The next message and the fds it carried, or None when the manager hung up or
        the link was closed on our side."""
        while True:
            if self.closed:
                return None
            try:
                data, anc, flags, _ = self._sock.recvmsg(RECV_SIZE, ANCILLARY_SPACE)
            except BlockingIOError:
                await self._readable()
                continue
            except ConnectionError:
                return None
            if not data and not anc:
                return None
            return unpack(data, anc, flags)

    async def _readable(self) -> None:
        ready = self._waiter = self._loop.create_future()
        self._loop.add_reader(self._fd, lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            # Once closed, the fd number may already belong to another socket.
            if not self.closed:
                self._loop.remove_reader(self._fd)
            self._waiter = None

    def close(self) -> None:
        """Close the connection; a receive() waiting on it returns None."""
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self._fd)
        self._sock.close()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
