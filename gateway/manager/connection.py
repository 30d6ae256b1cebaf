"""The manager's end of one front connection (a trio SEQPACKET socket): the protocol's
server side, with descriptors (gateway/core/protocol has the rules)."""

from __future__ import annotations

import trio

from gateway.core.protocol import Conversation, Message, Phase, Role
from gateway.ipc import ANCILLARY_SPACE, RECV_SIZE, ancillary, read_packet


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
