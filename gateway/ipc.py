"""Front <-> manager packets with their file descriptors (SCM_RIGHTS), for either side's
event loop (or none): turning a `Conversation`'s bytes and descriptors into what a
socket sends, and a received packet back into a message, and the errors every client of
the manager shares.
"""

from __future__ import annotations

import array
import os
import socket

from gateway.core.protocol import (
    MAX_LISTENERS,
    MAX_PACKET,
    Conversation,
    Message,
    RemoteProtocolError,
)

MAX_FDS = 1 + MAX_LISTENERS  # FrontSetup's: the audit trail and the listeners
ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
RECV_SIZE = MAX_PACKET


class ManagerError(Exception):
    """The dyno manager could not answer a request; the message is fit for the user."""


class ManagerUnavailable(ManagerError):
    """The dyno manager cannot be reached (not running, or restarting)."""


class ManagerGone(ManagerError):
    """The manager closed the connection before the conversation ended."""


class ManagerRefused(ManagerError):
    """The manager refused the request (Refused): its words are for the user."""


def ancillary(fds: list[int] | tuple[int, ...]) -> list[tuple[int, int, bytes]]:
    """The ancillary data that passes `fds` along with a packet."""
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % fds.itemsize
            fds.frombytes(data[:usable])
    return list(fds)


def read_packet(
    conversation: Conversation, data: bytes, ancdata: list[tuple[int, int, bytes]], flags: int
) -> tuple[Message, list[int]]:
    """The message in a received packet and the descriptors it carried. On a malformed,
    truncated or out-of-order one, its descriptors are closed and RemoteProtocolError
    raised, so a bad peer cannot leak descriptors into us."""
    fds = received_fds(ancdata)
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise RemoteProtocolError("packet or its descriptors truncated")
        return conversation.receive(data, len(fds)), fds
    except BaseException:
        close_all(fds)
        raise


def close_all(fds: list[int] | tuple[int, ...]) -> None:
    for fd in fds:
        os.close(fd)
