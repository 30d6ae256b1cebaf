"""The front's client of the dyno manager: one object per conversation (one SEQPACKET
connection), with a method for each step, so no caller writes out the protocol's
sequence or its messages by hand (gateway/core/protocol has the rules).

Errors every caller handles the same way: ManagerUnavailable (cannot connect),
ManagerGone (the manager closed the connection mid-way), ManagerRefused (its words are
for the user); a peer breaking the protocol is logged and counts as gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from gateway.core import protocol as p
from gateway.core.dyno import Exit
from gateway.ipc import (
    ANCILLARY_SPACE,
    RECV_SIZE,
    ManagerGone,
    ManagerRefused,
    ManagerUnavailable,
    ancillary,
    close_all,
    read_packet,
)

log = logging.getLogger(__name__)
Reply = TypeVar("Reply", bound=p.Message)


@dataclass(frozen=True)
class Streams:
    """A started dyno and its streams: a PTY master; or stdin, stdout and stderr; or stdin
    and one merged output; none when detached. The receiver owns the descriptors."""

    dyno: p.DynoInfo
    fds: list[int]


class Connector(Protocol):
    """How this front opens a new connection to the manager."""

    async def connect(self) -> socket.socket: ...


class PathConnector:
    """Through the manager's socket in the file system (a front started on its own)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, str(self.path))
        except OSError as exc:
            sock.close()
            raise ManagerUnavailable(f"the dyno manager is not available ({exc})") from None
        return sock


class BrokerConnector:
    """Through the broker the manager gave us when it started us: a new socket pair,
    one end passed over the broker (the manager serves it as an accepted connection),
    the other ours. No path, so nothing in the file system to reach or protect."""

    def __init__(self, fd: int) -> None:
        self._broker = socket.socket(fileno=fd)
        self._broker.setblocking(False)

    @property
    def fileno(self) -> int:
        return self._broker.fileno()

    async def connect(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            await self._pass(theirs.fileno())
        except OSError as exc:
            ours.close()
            raise ManagerUnavailable(f"the dyno manager is not available ({exc})") from None
        finally:
            theirs.close()
        ours.setblocking(False)
        return ours

    async def _pass(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                self._broker.sendmsg([b"c"], ancillary([fd]))
                return
            except BlockingIOError:
                writable = loop.create_future()
                loop.add_writer(self._broker, writable.set_result, None)
                try:
                    await writable
                finally:
                    loop.remove_writer(self._broker)


def connector(broker_fd: int | None, path: Path) -> Connector:
    """The broker when we were given one, else the manager's socket at `path`."""
    return BrokerConnector(broker_fd) if broker_fd is not None else PathConnector(path)


class ManagerLink:
    """One conversation with the manager. Closing it is what tells the manager that the
    client went away (the dyno is hung up)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None
        self._conversation = p.Conversation(p.Role.CLIENT)
        self.closed = False

    @classmethod
    async def open(cls, manager: Connector) -> ManagerLink:
        return cls(await manager.connect())

    # -- the conversations -------------------------------------------------------------

    async def start(self, run: p.Run | p.Enter) -> Streams:
        """Run a dyno (attached or detached), or a process inside a running one (Enter):
        it is up when this returns."""
        await self._send(run)
        return await self._started()

    async def forward(self, request: p.Forward) -> int:
        """A connection inside a running dyno: its socket (non-blocking, maybe still
        connecting), ours to close. The link then stays open until `until_ended`."""
        await self._send(request)
        message, fds = await self._receive_with_fds()
        if isinstance(message, p.Refused):
            raise ManagerRefused(message.message)
        assert isinstance(message, p.Forwarded)  # the conversation allows nothing else
        return fds[0]

    async def until_ended(self) -> None:
        """Until the dyno of a forwarded connection ends (or the manager goes away)."""
        with contextlib.suppress(ManagerGone):
            await self._reply(p.Ended)

    async def reserve(self, run: p.Run) -> p.DynoInfo:
        """Run with await_attach: the dyno is named and waits for `attach`."""
        await self._send(run)
        return (await self._reply(p.Reserved)).dyno

    async def attach(self) -> Streams:
        """The reserved dyno's client has come: start it."""
        await self._send(p.Attach())
        return await self._started()

    async def signal(self, name: str) -> None:
        """An SSH signal request for the dyno's foreground job; lost if the dyno ended."""
        if not self.closed and self._conversation.phase is p.Phase.RUNNING:
            with contextlib.suppress(ManagerGone, OSError):
                await self._send(p.Signal(name))

    async def exited(self) -> Exit:
        """How the attached dyno's command ended."""
        reply = await self._reply(p.Exited)
        return Exit(status=reply.status, signal=reply.signal)

    async def stop(self, app: str, dyno: str) -> None:
        await self._send(p.Stop(app, dyno))
        await self._reply(p.Stopping)

    async def list_dynos(self, app: str, dyno: str | None = None) -> tuple[p.DynoInfo, ...]:
        await self._send(p.ListDynos(app, dyno))
        return (await self._reply(p.DynoList)).dynos

    async def logs(self, request: p.Logs) -> AsyncIterator[p.LogLines | p.Dropped]:
        """The log's lines (and counts of lines dropped for a slow reader) until the end,
        or until the link is closed (a tail's reader left)."""
        await self._send(request)
        while True:
            message = await self._receive_or_none()
            if message is None or isinstance(message, p.End):
                return
            if isinstance(message, p.Refused):
                raise ManagerRefused(message.message)
            assert isinstance(message, p.LogLines | p.Dropped)
            yield message

    async def check_key(self, app: str, fingerprint: str) -> bool:
        """May this key (SHA256 fingerprint) log in to `app`?"""
        await self._send(p.CheckKey(app, fingerprint))
        return (await self._reply(p.KeyChecked)).allowed

    async def authorize(self, token: str, app: str | None) -> p.Authorized:
        """A Platform API token's apps (and `app`'s creation time, if it may use it)."""
        await self._send(p.Authorize(token, app))
        return await self._reply(p.Authorized)

    async def front_setup(self) -> tuple[p.FrontSetup, list[int]]:
        """This front's kit: the message, and the audit trail's descriptor followed by
        one listening socket per listener. The link stays open: our lifeline."""
        await self._send(p.FrontHello())
        message, fds = await self._receive_with_fds()
        if isinstance(message, p.Refused):
            raise ManagerRefused(message.message)
        assert isinstance(message, p.FrontSetup)  # the conversation allows nothing else
        return message, fds

    async def front_ready(self) -> None:
        await self._send(p.FrontReady())

    async def until_closed(self) -> None:
        """Wait until the manager closes this link (or breaks the protocol on it)."""
        with contextlib.suppress(ManagerGone):
            await self._receive()

    async def metrics(self) -> list[str]:
        await self._send(p.Metrics())
        lines: list[str] = []
        while not isinstance(message := await self._receive(), p.End):
            assert isinstance(message, p.MetricsText)
            lines.extend(message.lines)
        return lines

    # -- plumbing ----------------------------------------------------------------------

    async def _started(self) -> Streams:
        message, fds = await self._receive_with_fds()
        if isinstance(message, p.Refused):
            raise ManagerRefused(message.message)
        assert isinstance(message, p.Started)  # the conversation allows nothing else
        return Streams(message.dyno, fds)

    async def _reply(self, kind: type[Reply]) -> Reply:
        message = await self._receive()
        if isinstance(message, p.Refused):
            raise ManagerRefused(message.message)
        assert isinstance(message, kind)  # the conversation allows nothing else
        return message

    async def _send(self, message: p.Message) -> None:
        if self.closed:
            raise ManagerGone("the link to the dyno manager is closed")
        data = self._conversation.send(message)  # LocalProtocolError: the caller's
        try:
            # A SEQPACKET send is all or nothing, so one sock_sendall is one packet.
            await self._loop.sock_sendall(self._sock, data)
        except OSError as exc:
            raise ManagerGone(f"the dyno manager went away ({exc})") from None

    async def _receive(self) -> p.Message:
        message, fds = await self._receive_with_fds()
        close_all(fds)
        return message

    async def _receive_or_none(self) -> p.Message | None:
        try:
            return await self._receive()
        except ManagerGone:
            if self.closed:
                return None  # closed on our side: the reader left
            raise

    async def _receive_with_fds(self) -> tuple[p.Message, list[int]]:
        while True:
            if self.closed:
                raise ManagerGone("the link to the dyno manager is closed")
            try:
                data, anc, flags, _ = self._sock.recvmsg(RECV_SIZE, ANCILLARY_SPACE)
            except BlockingIOError:
                await self._readable()
                continue
            except ConnectionError:
                data, anc, flags = b"", [], 0
            if not data and not anc:
                raise ManagerGone("the dyno manager went away")
            try:
                return read_packet(self._conversation, data, anc, flags)
            except p.RemoteProtocolError as exc:
                log.error("bad packet from the dyno manager: %s", exc)
                self.close()
                raise ManagerGone("the dyno manager sent a bad reply") from None

    async def _readable(self) -> None:
        ready = self._waiter = self._loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        self._loop.add_reader(self._fd, wake)
        try:
            await ready
        finally:
            # Once closed, the fd number may already belong to another socket.
            if not self.closed:
                self._loop.remove_reader(self._fd)
            self._waiter = None

    def close(self) -> None:
        """Close the connection; a receive waiting on it ends with ManagerGone."""
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self._fd)
        self._sock.close()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def __aenter__(self) -> ManagerLink:
        return self

    async def __aexit__(self, *_: object) -> None:
        self.close()
