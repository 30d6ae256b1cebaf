"""Packing front <-> manager packets with their file descriptors (SCM_RIGHTS).

Each side sends and receives with its own event loop's socket calls; this module only
turns (message, fds) into (bytes, ancillary data) and back.
"""

from __future__ import annotations

import array
import os
import socket
from typing import Any

from gateway.core.messages import MAX_PACKET, BadMessage, decode

MAX_FDS = 4
ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
RECV_SIZE = MAX_PACKET


def ancillary(fds: list[int]) -> list[tuple[int, int, bytes]]:
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


def unpack(
    data: bytes, ancdata: list[tuple[int, int, bytes]], flags: int
) -> tuple[dict[str, Any], list[int]]:
    """Decode a received packet; on a malformed or truncated one, close any fds it carried
    and raise BadMessage, so a bad peer cannot leak descriptors into us."""
    fds = received_fds(ancdata)
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise BadMessage("packet or its descriptors truncated")
        return decode(data), fds
    except Exception:
        for fd in fds:
            os.close(fd)
        raise
