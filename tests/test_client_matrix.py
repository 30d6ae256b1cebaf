"""Every common SSH client against the gateway (docs/clients.md holds the table).

Each client runs one command with real stdin, separate stdout and stderr and an exit
status, and (where it can ask for one) a session on a terminal. Each exec session passes
through `KexTap`, a loopback relay that reads the two KEXINIT messages (sent in clear) and
so names what the client negotiated, for every client alike, Dropbear's (which prints
nothing about it) too.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import selectors
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import asyncssh
import paramiko
import pexpect
import pytest
import ssh.key
import ssh.options
import ssh.session
import ssh2.session

from gateway.front.ssh import ALGORITHMS
from tests.conftest import Gateway

STDIN = os.urandom(64 * 1024)  # more than one SSH packet, fresh each run
COMMAND = "sha256sum; printf 'to stderr\\n' >&2; exit 7"
STDOUT = f"{hashlib.sha256(STDIN).hexdigest()}  -\n".encode()
STDERR = b"to stderr\n"
STATUS = 7
TTY_COMMAND = "tty; stty size; exit 5"
TTY_STATUS = 5
ROWS, COLS = 33, 101  # the terminal size asked for, where the client can choose one
_NAMES = ("kex", "hostkey", "cipher_cs", "cipher_sc", "mac_cs", "mac_sc", "comp_cs", "comp_sc")
_AEAD = ("chacha20-poly1305@openssh.com", "aes128-gcm@openssh.com", "aes256-gcm@openssh.com")

# What each client negotiates (kex, host key, cipher, MAC; "-" where the cipher is an AEAD
# and carries its own). Kept equal to docs/clients.md: a client release that chooses
# differently fails here on purpose (for the Debian-packaged ones), so the table stays true.
DISTRIBUTION_PACKAGED = ("openssh", "plink", "dbclient")
NEGOTIATED = {
    "openssh": ("curve25519-sha256", "ssh-ed25519", "aes128-ctr", "umac-128-etm@openssh.com"),
    "plink": ("curve448-sha512", "ssh-ed25519", "aes256-ctr", "hmac-sha2-256"),
    "dbclient": ("curve25519-sha256", "ssh-ed25519", "aes128-ctr", "hmac-sha2-256"),
    "paramiko": ("mlkem768x25519-sha256", "ssh-ed25519", "aes128-ctr", "hmac-sha2-256"),
    "asyncssh": ("mlkem768x25519-sha256", "ssh-ed25519", "aes256-gcm@openssh.com", "-"),
    "libssh2": ("curve25519-sha256", "ssh-ed25519", "aes256-gcm@openssh.com", "-"),
    "libssh": ("curve25519-sha256", "ssh-ed25519", "aes256-gcm@openssh.com", "-"),
}  # fmt: skip


# -- the KEXINIT tap -----------------------------------------------------------------------


class _Kexinit:
    """Reads one direction of an SSH connection up to its first binary packet, the
    KEXINIT: the version line and the algorithm name-lists."""

    def __init__(self) -> None:
        self.buffer = b""
        self.version = ""
        self.lists: dict[str, list[str]] | None = None

    def feed(self, data: bytes) -> None:
        if self.lists is not None:
            return
        self.buffer += data
        while not self.version and b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            if line.startswith(b"SSH-"):  # a server may send other lines first
                self.version = line.rstrip(b"\r").decode()
        if not self.version or len(self.buffer) < 4:
            return
        (length,) = struct.unpack(">I", self.buffer[:4])
        if len(self.buffer) < 4 + length:
            return
        padding = self.buffer[4]
        payload = self.buffer[5 : 4 + length - padding]
        assert payload[0] == 20, f"first packet is type {payload[0]}, not KEXINIT"
        offset, lists = 17, {}  # after the type byte and the 16-byte cookie
        for name in _NAMES:
            (size,) = struct.unpack(">I", payload[offset : offset + 4])
            lists[name] = payload[offset + 4 : offset + 4 + size].decode().split(",")
            offset += 4 + size
        self.lists = lists


class KexTap:
    """A relay on a loopback port to the gateway, for one connection. Its one thread ends
    when both sides have closed, or when the `with` block ends, which waits for it."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.client = _Kexinit()
        self.server = _Kexinit()
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._relay, daemon=True)

    def __enter__(self) -> KexTap:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._wake_w.send(b"x")
        self._thread.join(30)
        for sock in (self.listener, self._wake_r, self._wake_w):
            sock.close()
        assert not self._thread.is_alive(), "the relay did not end"

    def _relay(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ)
            selector.register(self.listener, selectors.EVENT_READ)
            if all(key.fileobj is self._wake_r for key, _ in selector.select()):
                return
            downstream, _ = self.listener.accept()
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            peer = {downstream: (upstream, self.client), upstream: (downstream, self.server)}
            with downstream, upstream:
                selector.unregister(self.listener)
                for sock in peer:
                    selector.register(sock, selectors.EVENT_READ)
                while len(selector.get_map()) > 1:
                    for key, _ in selector.select():
                        if key.fileobj is self._wake_r:
                            return
                        source = key.fileobj
                        assert isinstance(source, socket.socket)
                        target, reader = peer[source]
                        try:
                            data = source.recv(65536)
                            if data:
                                reader.feed(data)
                                target.sendall(data)
                                continue
                            target.shutdown(socket.SHUT_WR)
                        except OSError:
                            return
                        selector.unregister(source)

    def negotiated(self, direction: str = "cs") -> tuple[str, str, str, str]:
        """What RFC 4253 section 7.1 makes of the two KEXINITs: for each algorithm the
        client's first that the server offers too; cipher and MAC client-to-server ("cs")
        or server-to-client ("sc")."""
        client, server = self.client.lists, self.server.lists
        assert client is not None and server is not None, "no KEXINIT seen"

        def first(name: str) -> str:
            chosen = [alg for alg in client[name] if alg in server[name]]
            assert chosen, f"no common {name}: {client[name]} / {server[name]}"
            return chosen[0]

        cipher = first(f"cipher_{direction}")
        mac = "-" if cipher in _AEAD else first(f"mac_{direction}")
        return first("kex"), first("hostkey"), cipher, mac


# -- the clients ---------------------------------------------------------------------------


@dataclass
class Outcome:
    stdout: bytes
    stderr: bytes
    status: int | None


@dataclass
class Target:
    """Where and as whom a client connects, and the key files in its own format."""

    gateway: Gateway
    app: str
    port: int
    keys: Path  # a directory: client.ppk for PuTTY, client.dropbear and HOME for Dropbear

    @property
    def key(self) -> Path:
        return self.gateway.client_key


def _host_key_blob(gateway: Gateway) -> str:
    return (gateway.root / "keys" / "ssh_host_ed25519_key.pub").read_text().split()[1]


def _home(target: Target) -> dict[str, str]:
    """The environment for PuTTY and Dropbear: a HOME of their own (PuTTY keeps a random
    seed there; Dropbear reads ~/.ssh/known_hosts, host names without the port)."""
    return {"PATH": os.environ["PATH"], "HOME": str(target.keys / "home")}


def _run(argv: list[str], env: dict[str, str] | None = None) -> Outcome:
    result = subprocess.run(argv, input=STDIN, capture_output=True, timeout=60, env=env)
    return Outcome(result.stdout, result.stderr, result.returncode)


def _openssh(target: Target, command: str, tty: bool = False) -> list[str]:
    argv = target.gateway.ssh_argv(target.app, command, tty=tty)
    argv[argv.index("-p") + 1] = str(target.port)
    return argv


def _plink(target: Target, command: str, tty: bool = False) -> list[str]:
    blob = base64.b64decode(_host_key_blob(target.gateway))
    fingerprint = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return [
        "plink", "-ssh", "-batch", "-noagent", "-t" if tty else "-T",
        "-hostkey", f"SHA256:{fingerprint}",  # the gateway's Ed25519 key, no prompt
        "-i", str(target.keys / "client.ppk"),
        "-P", str(target.port), "-l", target.app, "127.0.0.1", command,
    ]  # fmt: skip


def _dbclient(target: Target, command: str, tty: bool = False) -> list[str]:
    return [
        "dbclient", "-t" if tty else "-T",
        "-i", str(target.keys / "client.dropbear"),
        "-p", str(target.port), f"{target.app}@127.0.0.1", command,
    ]  # fmt: skip


def exec_openssh(target: Target) -> Outcome:
    return _run(_openssh(target, COMMAND))


def exec_plink(target: Target) -> Outcome:
    return _run(_plink(target, COMMAND), env=_home(target))


def exec_dbclient(target: Target) -> Outcome:
    return _run(_dbclient(target, COMMAND), env=_home(target))


def _paramiko_channel(target: Target) -> tuple[paramiko.SSHClient, paramiko.Channel]:
    client = paramiko.SSHClient()
    client.get_host_keys().add(
        f"[127.0.0.1]:{target.port}",
        "ssh-ed25519",
        paramiko.Ed25519Key(data=base64.b64decode(_host_key_blob(target.gateway))),
    )
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        "127.0.0.1",
        port=target.port,
        username=target.app,
        key_filename=str(target.key),
        look_for_keys=False,
        allow_agent=False,
        timeout=30,
    )
    transport = client.get_transport()
    assert transport is not None
    return client, transport.open_session(timeout=30)


def exec_paramiko(target: Target) -> Outcome:
    client, channel = _paramiko_channel(target)
    with client:
        channel.exec_command(COMMAND)
        channel.sendall(STDIN)
        channel.shutdown_write()
        stdout, stderr = channel.makefile("rb").read(), channel.makefile_stderr("rb").read()
        return Outcome(stdout, stderr, channel.recv_exit_status())


def tty_paramiko(target: Target) -> Outcome:
    client, channel = _paramiko_channel(target)
    with client:
        channel.get_pty("xterm", width=COLS, height=ROWS)
        channel.exec_command(TTY_COMMAND)
        return Outcome(channel.makefile("rb").read(), b"", channel.recv_exit_status())


def _asyncssh(target: Target, command: str, **options: object) -> Outcome:
    async def run() -> Outcome:
        host_key = asyncssh.import_public_key(f"ssh-ed25519 {_host_key_blob(target.gateway)}")
        async with asyncssh.connect(
            "127.0.0.1",
            target.port,
            username=target.app,
            client_keys=[str(target.key)],
            known_hosts=([host_key], [], []),
        ) as conn:
            result = await conn.run(command, encoding=None, check=False, **options)
            return Outcome(bytes(result.stdout or b""), bytes(result.stderr or b""),
                           result.exit_status)  # fmt: skip

    return asyncio.run(asyncio.wait_for(run(), 60))


def exec_asyncssh(target: Target) -> Outcome:
    return _asyncssh(target, COMMAND, input=STDIN)


def tty_asyncssh(target: Target) -> Outcome:
    return _asyncssh(target, TTY_COMMAND, term_type="xterm", term_size=(COLS, ROWS))


def _libssh2(target: Target, command: str, tty: bool) -> Outcome:
    with socket.create_connection(("127.0.0.1", target.port), timeout=60) as sock:
        session = ssh2.session.Session()
        session.handshake(sock)
        key, kind = session.hostkey()
        assert base64.b64encode(key).decode() == _host_key_blob(target.gateway), kind
        session.userauth_publickey_fromfile(target.app, str(target.key))
        channel = session.open_session()
        if tty:
            channel.pty("xterm")  # ssh2-python asks for libssh2's default size, 80x24
        channel.execute(command)
        if not tty:
            channel.write(STDIN)  # blocking: all of it
            channel.send_eof()
        stdout = b"".join(iter(lambda: channel.read()[1], b""))
        stderr = b"".join(iter(lambda: channel.read_stderr()[1], b""))
        channel.wait_eof()
        channel.close()
        channel.wait_closed()
        status = channel.get_exit_status()
        session.disconnect()
        return Outcome(stdout, stderr, status)


def exec_libssh2(target: Target) -> Outcome:
    return _libssh2(target, COMMAND, tty=False)


def tty_libssh2(target: Target) -> Outcome:
    return _libssh2(target, TTY_COMMAND, tty=True)


def _libssh(target: Target, command: str, tty: bool) -> Outcome:
    session = ssh.session.Session()
    session.options_set(ssh.options.HOST, "127.0.0.1")
    session.options_set_port(target.port)
    session.options_set(ssh.options.USER, target.app)
    session.options_set(ssh.options.KNOWNHOSTS, "/dev/null")
    session.options_set(ssh.options.TIMEOUT, "60")
    session.connect()
    try:
        served = session.get_server_publickey()
        assert served.export_pubkey_base64() == _host_key_blob(target.gateway).encode()
        session.userauth_publickey(ssh.key.import_privkey_file(str(target.key)))
        channel = session.channel_new()
        channel.open_session()
        if tty:
            channel.request_pty_size("xterm", COLS, ROWS)
        channel.request_exec(command)
        if not tty:
            channel.write(STDIN)
            channel.send_eof()
        stdout = b"".join(iter(lambda: channel.read()[1], b""))
        stderr = b"".join(iter(lambda: channel.read(is_stderr=True)[1], b""))
        status = channel.get_exit_status()
        channel.close()
        return Outcome(stdout, stderr, status)
    finally:
        session.disconnect()


def exec_libssh(target: Target) -> Outcome:
    return _libssh(target, COMMAND, tty=False)


def tty_libssh(target: Target) -> Outcome:
    return _libssh(target, TTY_COMMAND, tty=True)


def _on_terminal(argv: list[str], env: dict[str, str] | None = None) -> Outcome:
    """A command-line client on a real terminal of ROWS x COLS (stdout and stderr are
    one stream there)."""
    child = pexpect.spawn(argv[0], argv[1:], env=env, dimensions=(ROWS, COLS), timeout=60)
    output = child.read()
    child.close()
    return Outcome(output, b"", child.exitstatus)


EXEC: dict[str, Callable[[Target], Outcome]] = {
    "openssh": exec_openssh,
    "plink": exec_plink,
    "dbclient": exec_dbclient,
    "paramiko": exec_paramiko,
    "asyncssh": exec_asyncssh,
    "libssh2": exec_libssh2,
    "libssh": exec_libssh,
}
TTY: dict[str, Callable[[Target], Outcome]] = {
    "openssh": lambda target: _on_terminal(_openssh(target, TTY_COMMAND, tty=True)),
    "plink": lambda target: _on_terminal(_plink(target, TTY_COMMAND, tty=True), _home(target)),
    "dbclient": lambda target: _on_terminal(
        _dbclient(target, TTY_COMMAND, tty=True), _home(target)
    ),
    "paramiko": tty_paramiko,
    "asyncssh": tty_asyncssh,
    "libssh2": tty_libssh2,
    "libssh": tty_libssh,
}
_TOOLS = {
    "plink": "putty-tools",
    "puttygen": "putty-tools",
    "dbclient": "dropbear-bin",
    "dropbearconvert": "dropbear-bin",
}


@pytest.fixture(scope="module")
def keys(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test client key in PuTTY's and Dropbear's formats, and the HOME of both, where
    Dropbear finds the gateway's host key."""
    for tool, package in _TOOLS.items():
        assert shutil.which(tool), f"{tool} missing: apt-get install {package} (./dev test does)"
    directory = tmp_path_factory.mktemp("client-keys")
    known = directory / "home" / ".ssh" / "known_hosts"
    known.parent.mkdir(parents=True)
    known.write_text(f"127.0.0.1 ssh-ed25519 {_host_key_blob(gateway)}\n")
    env = {"PATH": os.environ["PATH"], "HOME": str(directory / "home")}
    key = str(gateway.client_key)
    for argv in (
        ["puttygen", key, "-O", "private", "-o", str(directory / "client.ppk")],
        ["dropbearconvert", "openssh", "dropbear", key, str(directory / "client.dropbear")],
    ):
        subprocess.run(argv, check=True, capture_output=True, env=env, timeout=30)
    return directory


@pytest.fixture(scope="module")
def app(gateway: Gateway) -> str:
    return gateway.new_app()


@pytest.mark.parametrize("client", EXEC)
def test_exec_with_stdin_stdout_stderr_and_status(
    gateway: Gateway, app: str, keys: Path, client: str
) -> None:
    with KexTap(gateway.port) as tap:
        outcome = EXEC[client](Target(gateway, app, tap.port, keys))
    assert outcome.stdout == STDOUT, outcome.stderr  # all of stdin reached the dyno
    assert outcome.stderr == STDERR
    assert outcome.status == STATUS
    negotiated = tap.negotiated()
    # The row of docs/clients.md (run with -s to see them all).
    print(f"\n| {client} | {tap.client.version} | {' | '.join(negotiated)} |")
    # Every choice is one the gateway offers, whatever the client's version.
    offered = ALGORITHMS["kex_algs"], ALGORITHMS["encryption_algs"], ALGORITHMS["mac_algs"]
    kex, _, cipher, mac = negotiated
    assert kex in offered[0] and cipher in offered[1] and (mac == "-" or mac in offered[2])
    if client in DISTRIBUTION_PACKAGED:
        # Debian fixes these versions for its release: the table must hold exactly. The
        # PyPI clients may move with a new release; their rows are refreshed by hand.
        assert negotiated == NEGOTIATED[client], "update docs/clients.md and NEGOTIATED"
    assert tap.negotiated("sc") == negotiated


@pytest.mark.parametrize("client", TTY)
def test_session_on_a_terminal(gateway: Gateway, app: str, keys: Path, client: str) -> None:
    outcome = TTY[client](Target(gateway, app, gateway.port, keys))
    rows, cols = (24, 80) if client == "libssh2" else (ROWS, COLS)
    assert re.search(rf"/dev/pts/\d+\r\n{rows} {cols}\r\n", outcome.stdout.decode()), outcome
    assert outcome.status == TTY_STATUS
