"""The changes the front carries to asyncssh 2.24 for throughput (docs/benchmarks.md):
packet crypto keyed once per direction (gateway/front/crypto.py), no ignore packet
before every packet and input fed a packet's worth at a time
(gateway/front/connection.py), and the channel's fewer copies (gateway/front/channel.py).

Each is checked to compute what asyncssh computes, end to end with the OpenSSH client
for every cipher and MAC the gateway offers; and each has a test that fails once
asyncssh itself stops doing what the change works around, so that the change can go.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import os
import subprocess

import asyncssh
import pytest
from asyncssh import connection as asyncssh_connection
from asyncssh import encryption as asyncssh_encryption
from asyncssh import mac as asyncssh_mac
from asyncssh.constants import MSG_IGNORE
from asyncssh.crypto import umac64, umac128
from asyncssh.crypto.cipher import GCMCipher
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.front import crypto
from gateway.front.ssh import ALGORITHMS
from tests.conftest import Gateway

# Random, so that a wrong byte anywhere changes the digest.
PAYLOAD = os.urandom(3 * 1024 * 1024 + 12345)
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


# What they compute


@pytest.mark.parametrize("umac", [umac64, umac128], ids=["umac-64", "umac-128"])
def test_umac_keyed_once_signs_as_asyncssh_does(umac: object) -> None:
    key = os.urandom(16)
    size = 8 if umac is umac64 else 16
    ours, theirs = crypto.KeyedOnceUMAC(key, size, umac), asyncssh_mac._UMAC(key, size, umac)
    # Consecutive and scattered sequence numbers, empty to two-packet-long messages.
    for seq in [*range(5), 255, 256, 65535, 2**32 - 1, 7]:
        packet = os.urandom(seq % 70000)
        assert ours.sign(seq, packet) == theirs.sign(seq, packet)
        assert ours.verify(seq, packet, theirs.sign(seq, packet))
        assert not ours.verify(seq + 1, packet, theirs.sign(seq, packet))


@pytest.mark.parametrize("name", ["aes128-gcm", "aes256-gcm"])
def test_gcm_keyed_once_seals_and_opens_as_asyncssh_does(name: str) -> None:
    key, iv = os.urandom(16 if name == "aes128-gcm" else 32), os.urandom(12)
    ours = crypto.KeyedOnceGCMEncryption.new(name, key, iv)
    theirs = asyncssh_encryption.GCMEncryption.new(name, key, iv)
    reader = asyncssh_encryption.GCMEncryption.new(name, key, iv)
    ours_reader = crypto.KeyedOnceGCMEncryption.new(name, key, iv)
    for seq in range(6):
        header, body = os.urandom(4), os.urandom(16 * (1 + seq * 300))
        sealed, tag = ours.encrypt_packet(seq, header, body)
        assert (bytes(sealed), tag) == theirs.encrypt_packet(seq, header, body)
        first, rest = bytes(sealed)[:16], bytes(sealed)[16:]
        assert reader.decrypt_packet(seq, first, rest, 4, tag) == body
        assert ours_reader.decrypt_packet(seq, first, rest, 4, tag) == body
    # A packet altered on the way is refused, as asyncssh refuses it.
    header, body = os.urandom(4), os.urandom(64)
    sealed, tag = ours.encrypt_packet(9, header, body)
    tampered = bytes(sealed)[:20] + bytes([sealed[20] ^ 1]) + bytes(sealed)[21:]
    assert ours_reader.decrypt_packet(9, tampered[:16], tampered[16:], 4, tag) is None


# End to end: every cipher and MAC the gateway offers, both directions


def _offered() -> list[tuple[str, str]]:
    pairs = [(c, "") for c in ALGORITHMS["encryption_algs"] if "gcm" in c]
    ctr = [c for c in ALGORITHMS["encryption_algs"] if "ctr" in c]
    pairs += [(ctr[i % len(ctr)], m) for i, m in enumerate(ALGORITHMS["mac_algs"])]
    return pairs


@pytest.mark.parametrize(("cipher", "mac"), _offered(), ids=lambda x: x or "aead")
def test_every_cipher_and_mac_carries_bytes_intact(gateway: Gateway, cipher: str, mac: str) -> None:
    app = gateway.new_app()
    options = ["-c", cipher] + (["-m", mac] if mac else [])
    argv = gateway.ssh_argv(app, "sha256sum; head -c 1234567 /dev/urandom | tee /tmp/sent |"
                            " sha256sum >&2; cat /tmp/sent")  # fmt: skip
    argv[1:1] = options
    result = subprocess.run(argv, input=PAYLOAD, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    down = result.stdout.split(b"\n", 1)
    assert down[0].split()[0].decode() == DIGEST  # up: what the dyno received
    # down: what the client received is what the dyno sent
    assert hashlib.sha256(down[1]).hexdigest() == result.stderr.split()[0].decode()
    assert len(down[1]) == 1234567


@pytest.mark.parametrize("cipher", ["aes128-gcm@openssh.com", "aes128-ctr"])
def test_bytes_stay_intact_across_rekeys(gateway: Gateway, cipher: str) -> None:
    """A client that rekeys every 64 KB: data packets wait out each key exchange (the
    short way for data packets in gateway/front/connection.py steps aside) and go on
    under the new keys."""
    app = gateway.new_app()

    async def run() -> asyncssh.SSHCompletedProcess:
        async with asyncssh.connect(
            "127.0.0.1", gateway.port, username=app, known_hosts=None,
            client_keys=[str(gateway.client_key)], encryption_algs=[cipher],
            mac_algs=["umac-128-etm@openssh.com"], rekey_bytes=65536,
        ) as conn:  # fmt: skip
            return await conn.run("sha256sum; head -c 2000000 /dev/zero",
                                  input=PAYLOAD, encoding=None, check=True)  # fmt: skip

    result = asyncio.run(run())
    assert result.stdout.split()[0].decode() == DIGEST
    assert result.stdout.endswith(b"\0" * 2000000) and len(result.stdout) == 2000000 + 68


def test_no_cbc_cipher_is_offered() -> None:
    """gateway/front/connection.py leaves out the ignore packets that protect CBC."""
    assert not [c for c in ALGORITHMS["encryption_algs"] if "cbc" in c]


# Until asyncssh does it itself


def test_stock_asyncssh_keys_umac_for_every_packet() -> None:
    calls: list[bytes] = []

    def keyed(key: bytes, *args: object) -> object:
        calls.append(key)
        return umac128(key, *args)

    stock = asyncssh_mac._UMAC(os.urandom(16), 16, keyed)
    for seq in range(3):
        stock.sign(seq, b"packet")
    if len(calls) < 3:
        pytest.fail(
            f"asyncssh {asyncssh.__version__} keys UMAC once now; the UMAC part of "
            "gateway/front/crypto.py may go"
        )


def test_stock_asyncssh_makes_an_aesgcm_for_every_packet() -> None:
    stock = GCMCipher("aes128-gcm", os.urandom(16), os.urandom(12))
    stock.encrypt_and_sign(b"head", b"x" * 16)
    if any(isinstance(value, AESGCM) for value in vars(stock).values()):
        pytest.fail(
            f"asyncssh {asyncssh.__version__} keeps its AESGCM now; the GCM part of "
            "gateway/front/crypto.py may go"
        )


def test_stock_asyncssh_sends_an_ignore_packet_before_every_packet(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counts the ignore packets an asyncssh client receives while 1 MB comes down: from
    a stock asyncssh server, one per packet; from the gateway, none."""
    received: list[int] = []
    handlers = asyncssh_connection.SSHConnection._packet_handlers
    process_ignore = handlers[MSG_IGNORE]

    def counted(self: asyncssh_connection.SSHConnection, *args: object) -> None:
        if self.is_client():
            received.append(1)
        process_ignore(self, *args)

    monkeypatch.setitem(handlers, MSG_IGNORE, counted)  # asyncssh's table, for this test
    app = gateway.new_app()

    async def download(port: int, user: str, **options: object) -> int:
        received.clear()
        async with asyncssh.connect(
            "127.0.0.1", port, username=user, known_hosts=None, **options
        ) as conn:
            result = await conn.run("head -c 1048576 /dev/zero", encoding=None, check=True)
        assert len(result.stdout) == 1048576
        return len(received)

    async def stock_server() -> int:
        class Server(asyncssh.SSHServer):
            def begin_auth(self, username: str) -> bool:
                return False

        async def handle(process: asyncssh.SSHServerProcess) -> None:
            process.stdout.write(b"\0" * 1048576)
            process.exit(0)

        server = await asyncssh.create_server(
            Server, "127.0.0.1", 0, encoding=None, process_factory=handle,
            server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
        )  # fmt: skip
        try:
            return await download(server.sockets[0].getsockname()[1], "x")
        finally:
            server.close()

    ours = asyncio.run(download(gateway.port, app, client_keys=[str(gateway.client_key)]))
    theirs = asyncio.run(stock_server())
    assert ours == 0, ours
    if theirs < 32:  # 1 MB is at least 32 packets of 32 KB
        pytest.fail(
            f"asyncssh {asyncssh.__version__} no longer sends an ignore packet before "
            f"every packet ({theirs} for 1 MB); gateway/front/connection.py may go"
        )


def test_stock_asyncssh_reslices_its_input_for_every_packet() -> None:
    """gateway/front/connection.py feeds asyncssh a packet's worth at a time because it
    keeps its input in one bytes object and copies the rest of it twice per packet."""
    header = inspect.getsource(asyncssh_connection.SSHConnection._recv_pkthdr)
    packet = inspect.getsource(asyncssh_connection.SSHConnection._recv_packet)
    if "self._inpbuf = self._inpbuf[" not in header + packet:
        pytest.fail(
            f"asyncssh {asyncssh.__version__} no longer re-slices its input per packet; "
            "the feeding in gateway/front/connection.py may go"
        )
