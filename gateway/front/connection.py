"""The server connection asyncssh makes, without an ignore packet before every packet,
and fed what arrives a packet's worth at a time.

asyncssh 2.24 sends an empty SSH_MSG_IGNORE before every packet once encryption is on
(`SSHConnection.send_packet`): the countermeasure RFC 4251 (9.3.1) describes for CBC
modes, whose next IV an attacker could otherwise know. The gateway offers no CBC cipher
(front/ssh.py ALGORITHMS: AES-GCM and AES-CTR, with encrypt-then-MAC), so each ignore
packet is pure cost: a second packet built, encrypted and MACed in Python for every
data packet of a transfer. OpenSSH sends none. Here they are left out.

Feeding: asyncssh keeps what arrived in one bytes object and re-slices the rest of it
twice per packet (`_recv_pkthdr`, `_recv_packet`), so a 256 KB read (asyncio's most)
holding eight 32 KB packets was copied about nine times over on uploads. Fed in pieces
of about a packet, it is copied about three times.

tests/test_asyncssh_patches.py checks that OpenSSH and asyncssh clients still talk to
the gateway, and fails once asyncssh stops sending ignore packets itself or stops
re-slicing its input (then this can go).
"""

from __future__ import annotations

from typing import Any

import asyncssh
from asyncssh.constants import MSG_IGNORE
from asyncssh.packet import String

_EMPTY = String(b"")
# A packet of the largest the OpenSSH client sends (32 KB of data), with its headers.
FEED = 33 * 1024


class ServerConnection(asyncssh.SSHServerConnection):
    def send_packet(self, pkttype: int, *args: bytes, handler: Any = None) -> None:
        if pkttype == MSG_IGNORE and args == (_EMPTY,):
            return  # the per-packet countermeasure for CBC: no CBC cipher is offered
        super().send_packet(pkttype, *args, handler=handler)

    def data_received(self, data: bytes, datatype: Any = None) -> None:
        if len(data) <= FEED:
            super().data_received(data, datatype)
            return
        view = memoryview(data)
        for start in range(0, len(data), FEED):
            if self._transport is None:  # closed by what an earlier piece held
                return
            super().data_received(view[start : start + FEED], datatype)  # type: ignore[arg-type]
