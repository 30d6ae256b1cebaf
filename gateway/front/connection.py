"""The server connection asyncssh makes, without an ignore packet before every packet,
with data packets built with fewer copies, and fed what arrives a packet's worth at a
time.

asyncssh 2.24 sends an empty SSH_MSG_IGNORE before every packet once encryption is on
(`SSHConnection.send_packet`): the countermeasure RFC 4251 (9.3.1) describes for CBC
modes, whose next IV an attacker could otherwise know. The gateway offers no CBC cipher
(front/ssh.py ALGORITHMS: AES-GCM and AES-CTR, with encrypt-then-MAC), so each ignore
packet is pure cost: a second packet built, encrypted and MACed in Python for every
data packet of a transfer. OpenSSH sends none. Here they are left out.

Data packets: asyncssh joins a packet's payload, then pads it in two more joins, joins
the header to the ciphertext and the ciphertext to the MAC. For data packets on an
established connection (keys and authentication done, no rekey due, no compression,
encrypt-then-MAC or AES-GCM) the packet is built in one join and handed on in pieces;
anything else takes asyncssh's own path.

Feeding: asyncssh keeps what arrived in one bytes object and re-slices the rest of it
twice per packet (`_recv_pkthdr`, `_recv_packet`), so a 256 KB read (asyncio's most)
holding eight 32 KB packets was copied about nine times over on uploads. Fed in pieces
of about a packet, it is copied about three times.

tests/test_asyncssh_patches.py checks that OpenSSH and asyncssh clients still talk to
the gateway, and fails once asyncssh stops sending ignore packets itself or stops
re-slicing its input (then this can go).
"""

from __future__ import annotations

import os
import time
from typing import Any

import asyncssh
from asyncssh.constants import MSG_CHANNEL_DATA, MSG_CHANNEL_EXTENDED_DATA, MSG_IGNORE
from asyncssh.encryption import ETMEncryption
from asyncssh.packet import String, UInt32

from gateway.front.crypto import KeyedOnceGCMEncryption

_EMPTY = String(b"")
DATA = (MSG_CHANNEL_DATA, MSG_CHANNEL_EXTENDED_DATA)
# A packet of the largest the OpenSSH client sends (32 KB of data), with its headers.
FEED = 33 * 1024


class ServerConnection(asyncssh.SSHServerConnection):
    def send_packet(self, pkttype: int, *args: bytes, handler: Any = None) -> None:
        if pkttype == MSG_IGNORE and args == (_EMPTY,):
            return  # the per-packet countermeasure for CBC: no CBC cipher is offered
        if pkttype in DATA and self._can_send_data():
            self._send_data(pkttype, args, handler or self)
            return
        super().send_packet(pkttype, *args, handler=handler)

    def _can_send_data(self) -> bool:
        """Whether a data packet may take the short way: keys and authentication done,
        no rekey due, no compression, and one of the encryptions it knows."""
        return (
            self._kex_complete
            and self._auth_complete
            and self._compressor is None
            and self._rekey_bytes_sent < self._rekey_bytes
            and not (self._rekey_seconds and time.monotonic() >= self._rekey_time)
            and type(self._send_encryption) in (ETMEncryption, KeyedOnceGCMEncryption)
        )

    def _send_data(self, pkttype: int, args: tuple[bytes, ...], handler: Any) -> None:
        """asyncssh's send_packet for a data packet, with the packet built in one join
        and handed to the transport in pieces (the channel joins one flush's pieces):
        asyncssh copies the data five times more on the way."""
        size = 1 + sum(len(arg) for arg in args)
        padlen = -(self._send_enchdrlen + size) % self._send_blocksize
        if padlen < 4:
            padlen += self._send_blocksize
        body = b"".join((bytes((padlen, pkttype)), *args, os.urandom(padlen)))
        header = UInt32(len(body))
        seq = self._send_seq
        encryption: Any = self._send_encryption
        if isinstance(encryption, KeyedOnceGCMEncryption):
            sealed = encryption.seal(header, body)  # ciphertext and tag, as on the wire
            self._send(header)
            self._send(sealed)
        else:  # encrypt, then MAC the header and ciphertext
            packet = header + encryption._cipher.encrypt(body)
            self._send(packet)
            self._send(encryption._mac.sign(seq, packet))
        self._send_seq = (seq + 1) & 0xFFFFFFFF
        self._rekey_bytes_sent += len(body)
        handler.log_sent_packet(pkttype, seq, memoryview(body)[1 : 1 + size])

    def data_received(self, data: bytes, datatype: Any = None) -> None:
        if len(data) <= FEED:
            super().data_received(data, datatype)
            return
        view = memoryview(data)
        for start in range(0, len(data), FEED):
            if self._transport is None:  # closed by what an earlier piece held
                return
            super().data_received(view[start : start + FEED], datatype)  # type: ignore[arg-type]
