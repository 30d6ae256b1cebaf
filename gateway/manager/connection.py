"""The manager's end of one front connection (a trio SEQPACKET socket): the protocol's
server side, with descriptors (gateway/core/protocol has the rules)."""

from __future__ import annotations

from collections.abc import Callable

import trio

from gateway.core.protocol import (
    Conversation,
    Message,
    Phase,
    RemoteProtocolError,
    Role,
    Signal,
)
from gateway.eventlog import EventLog
from gateway.ipc import ANCILLARY_SPACE, RECV_SIZE, ancillary, close_all, read_packet


class FrontConnection:
    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.conversation = Conversation(Role.SERVER)

    @property
    def phase(self) -> Phase:
        return self.conversation.phase

    async def receive(self) -> tuple[Message, list[int]] | None:
        """The front's next message and its descriptors; None when the front closed the
        connection (or it broke). RemoteProtocolError for a message out of place."""
        try:
            data, anc, flags, _ = await self.sock.recvmsg(RECV_SIZE, ANCILLARY_SPACE)
        except OSError:
            return None
        if not data and not anc:
            return None
        return read_packet(self.conversation, data, anc, flags)

    async def send(self, message: Message, fds: list[int] | tuple[int, ...] = ()) -> None:
        """One message (and descriptors); OSError if the front has gone."""
        data = self.conversation.send(message, len(fds))
        await self.sock.sendmsg([data], ancillary(fds))

    async def relay_signals(self, log: EventLog, deliver: Callable[[str], None]) -> None:
        """A running session's signal requests (`deliver` gets each name: INT, TERM...),
        until the front closes the conversation: its client is gone."""
        while True:
            try:
                received = await self.receive()
            except RemoteProtocolError as exc:
                log.warning("bad message from the front error=%s", exc)
                continue
            if received is None:
                return
            message, fds = received
            close_all(fds)  # the conversation allows none from the front
            assert isinstance(message, Signal)  # the only message the front may send now
            log.info("signal %s", message.name)
            deliver(message.name)
