"""A blocking client of the manager's socket, for the admin CLI (`gateway ps:stop`,
`gateway logs --tail`)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gateway.core.messages import encode
from gateway.ipc import ANCILLARY_SPACE, RECV_SIZE, unpack


class ManagerUnreachable(Exception):
    pass


def request(path: Path, kind: str, **fields: Any) -> Iterator[dict[str, Any]]:
    """Send one request; yield the manager's replies until it closes the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise ManagerUnreachable(
                f"the gateway is not running here ({path}: {exc.strerror})"
            ) from None
        sock.send(encode(kind, **fields))
        while True:
            data, anc, flags, _ = sock.recvmsg(RECV_SIZE, ANCILLARY_SPACE)
            if not data:
                return
            message, fds = unpack(data, anc, flags)
            for fd in fds:
                os.close(fd)
            yield message
