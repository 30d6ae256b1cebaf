"""Packet crypto keyed once per direction, where asyncssh 2.24 keys it for every packet.

- UMAC (`asyncssh.mac._UMAC.sign`): a new Nettle context, keyed, for every packet
  signed or checked. The key setup derives about a kilobyte of subkeys with AES, more
  work than the MAC of a 32 KB packet itself. UMAC is made to be keyed once and given a
  nonce per message (RFC 4418); SSH's nonce is the packet's sequence number, so one
  keyed context per direction serves every packet: set the nonce, feed the packet, take
  the digest (which resets the hash for the next one). umac-128-etm@openssh.com with
  aes128-ctr is what OpenSSH clients get here by default.
- AES-GCM (`asyncssh.crypto.cipher.GCMCipher`): a new AESGCM object for every packet,
  and the sealed packet sliced and joined twice more. Here one AESGCM per direction,
  and the ciphertext handed on as a view.

`install()` registers these for asyncssh's algorithms, in the front only.
tests/test_asyncssh_patches.py checks that they compute exactly what asyncssh does, and
fails once asyncssh stops keying per packet (then this module can go).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from asyncssh import encryption as asyncssh_encryption
from asyncssh import mac as asyncssh_mac
from asyncssh.crypto.cipher import GCMCipher
from asyncssh.packet import UInt64
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

GCM_TAG = 16


class KeyedOnceUMAC(asyncssh_mac._UMAC):
    def __init__(self, key: bytes, hash_size: int, umac_alg: Callable[..., Any]) -> None:
        super().__init__(key, hash_size, umac_alg)
        self._context = umac_alg(key)

    def sign(self, seq: int, packet: bytes) -> bytes:
        context = self._context
        context.set_nonce(UInt64(seq))
        context.update(packet)
        return bytes(context.digest())


class KeyedOnceGCMCipher(GCMCipher):
    def __init__(self, cipher_name: str, key: bytes, iv: bytes) -> None:
        super().__init__(cipher_name, key, iv)
        self._aead = AESGCM(key)

    def encrypt_and_sign(self, header: bytes, data: bytes) -> tuple[bytes, bytes]:
        sealed = self._aead.encrypt(self._iv, data, header)
        self._update_iv()
        return header + memoryview(sealed)[:-GCM_TAG], sealed[-GCM_TAG:]


class KeyedOnceGCMEncryption(asyncssh_encryption.GCMEncryption):
    @classmethod
    def new(
        cls, cipher_name: str, key: bytes, iv: bytes, mac_alg: bytes = b"",
        mac_key: bytes = b"", etm: bool = False,
    ) -> KeyedOnceGCMEncryption:  # fmt: skip
        return cls(KeyedOnceGCMCipher(cipher_name, key, iv))

    def seal(self, header: bytes, body: bytes) -> bytes:
        """The body encrypted, then its tag: what follows the header on the wire."""
        cipher: KeyedOnceGCMCipher = self._cipher  # type: ignore[assignment]
        sealed: bytes = cipher._aead.encrypt(cipher._iv, body, header)
        cipher._update_iv()
        return sealed

    def decrypt_packet(
        self, seq: int, first: bytes, rest: bytes, header_len: int, mac: bytes
    ) -> bytes | None:
        # asyncssh joins the ciphertext, then the ciphertext and the tag: once here.
        sealed = b"".join((memoryview(first)[header_len:], rest, mac))
        cipher: KeyedOnceGCMCipher = self._cipher  # type: ignore[assignment]
        try:
            plain: bytes | None = cipher._aead.decrypt(cipher._iv, sealed, first[:header_len])
        except InvalidTag:
            plain = None
        cipher._update_iv()
        return plain


def install() -> None:
    """Use the classes above for asyncssh's UMAC and AES-GCM algorithms."""
    macs = asyncssh_mac._mac_handler
    for alg, (handler, hash_size, args) in list(macs.items()):
        if handler is asyncssh_mac._UMAC:
            macs[alg] = (KeyedOnceUMAC, hash_size, args)
    ciphers = asyncssh_encryption._enc_params
    for alg, (encryption, cipher_name) in list(ciphers.items()):
        if encryption is asyncssh_encryption.GCMEncryption:
            ciphers[alg] = (KeyedOnceGCMEncryption, cipher_name)
