"""The server connection asyncssh makes, without an ignore packet before every packet.

asyncssh 2.24 sends an empty SSH_MSG_IGNORE before every packet once encryption is on
(`SSHConnection.send_packet`): the countermeasure RFC 4251 (9.3.1) describes for CBC
modes, whose next IV an attacker could otherwise know. The gateway offers no CBC cipher
(front/ssh.py ALGORITHMS: AES-GCM and AES-CTR, with encrypt-then-MAC), so each ignore
packet is pure cost: a second packet built, encrypted and MACed in Python for every
data packet of a transfer. OpenSSH sends none. Here they are left out.

tests/test_asyncssh_patches.py checks that OpenSSH and asyncssh clients still talk to
the gateway, and fails once asyncssh stops sending them itself (then this can go).
"""

from __future__ import annotations

from typing import Any

import asyncssh
from asyncssh.constants import MSG_IGNORE
from asyncssh.packet import String

_EMPTY = String(b"")


class ServerConnection(asyncssh.SSHServerConnection):
    def send_packet(self, pkttype: int, *args: bytes, handler: Any = None) -> None:
        if pkttype == MSG_IGNORE and args == (_EMPTY,):
            return  # the per-packet countermeasure for CBC: no CBC cipher is offered
        super().send_packet(pkttype, *args, handler=handler)
