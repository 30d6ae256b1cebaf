"""A blocking client of the manager's socket, for the admin CLI (`gateway ps:stop`,
`gateway logs --tail`, `gateway ps`)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

from gateway.core.protocol import Conversation, Message, Refused, Role
from gateway.ipc import (
    ANCILLARY_SPACE,
    RECV_SIZE,
    ManagerRefused,
    ManagerUnavailable,
    close_all,
    read_packet,
)


def request(path: Path, message: Message) -> Iterator[Message]:
    """Send one request; yield the manager's replies until the conversation ends (or the
    manager closes it). A Refused reply raises ManagerRefused."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise ManagerUnavailable(
                f"the gateway is not running here ({path}: {exc.strerror})"
            ) from None
        conversation = Conversation(Role.CLIENT)
        sock.send(conversation.send(message))
        while True:
            data, anc, flags, _ = sock.recvmsg(RECV_SIZE, ANCILLARY_SPACE)
            if not data and not anc:
                return
            reply, fds = read_packet(conversation, data, anc, flags)
            close_all(fds)  # the admin CLI asks for nothing that carries descriptors
            if isinstance(reply, Refused):
                raise ManagerRefused(reply.message)
            yield reply
