"""Pre-auth limits, the env allow-list and the algorithms, against real clients.

Every test runs its own gateway on loopback, configured for what it shows; the limits'
arithmetic is tested without sockets in tests/test_prelimits.py.
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from gateway.audit import AuditLog
from gateway.config import SSHSettings
from gateway.front.attached import AttachedSessions
from gateway.front.gate import Pending
from gateway.front.link import PathConnector
from gateway.front.observe import Observer
from gateway.front.ssh import GatewayServer, PreAuthLimits
from gateway.front.ssh_session import SessionServices
from gateway.store import SQLiteStore
from tests.conftest import Gateway, _client_key, wait_until


def _start(gw: Gateway, ssh_config: str) -> Gateway:
    gw.ssh_config = ssh_config
    gw.write_config()
    gw.start()
    return gw


def _log_lines(gw: Gateway, pattern: str) -> list[str]:
    return [line for line in list(gw.log) if re.search(pattern, line)]


def _ssh_argv(
    gw: Gateway, app: str, command: str, keys: list[Path], source: str | None = None
) -> list[str]:
    """OpenSSH trying `keys` in order, from `source` (a loopback address) if given."""
    argv = gw.ssh_argv(app, command, key=keys[0])
    after = argv.index(str(keys[0])) + 1
    argv[after:after] = [arg for key in keys[1:] for arg in ("-i", str(key))]
    if source is not None:
        argv[1:1] = ["-b", source]
    return argv


def _run(argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, capture_output=True, timeout=timeout)


def _wrong_keys(gw: Gateway, count: int) -> list[Path]:
    return [_client_key(gw.root, f"stranger{i}") for i in range(count)]


# -- per-source penalty -------------------------------------------------------------------


def test_failed_authentications_refuse_that_source_for_the_penalty_time(
    own_gateway: Gateway,
) -> None:
    gw = _start(own_gateway, "penalty_failures = 10\npenalty_time = 8\n")
    app = gw.new_app()
    for stranger in _wrong_keys(gw, 10):  # ten different keys: a probe, not a mistake
        result = _run(_ssh_argv(gw, app, "true", [stranger], source="127.0.0.2"))
        assert result.returncode == 255 and b"Permission denied" in result.stderr
    assert wait_until(lambda: _log_lines(gw, "source penalized source=127.0.0.2 "), 5)
    penalized_at = time.monotonic()
    # The right key from the penalized address: dropped at connect.
    refused = _run(_ssh_argv(gw, app, "echo hi", [gw.client_key], source="127.0.0.2"))
    assert refused.returncode == 255 and refused.stdout == b""
    assert b"Permission denied" not in refused.stderr  # never got as far as auth
    assert _log_lines(gw, r"connection refused conn=\S+ source=127\.0\.0\.2 reason=penalty")
    # Another source is unaffected, wrong key or right.
    other = _run(_ssh_argv(gw, app, "echo hi", [gw.client_key], source="127.0.0.3"))
    assert other.returncode == 0 and other.stdout == b"hi\n", other.stderr
    stranger = _wrong_keys(gw, 1)
    assert b"Permission denied" in _run(_ssh_argv(gw, app, "true", stranger, "127.0.0.3")).stderr
    # Still refused late in the penalty; let in once it is served.
    time.sleep(max(0.0, penalized_at + 6 - time.monotonic()))
    assert _run(_ssh_argv(gw, app, "true", [gw.client_key], "127.0.0.2")).returncode == 255
    time.sleep(max(0.0, penalized_at + 8.5 - time.monotonic()))
    back = _run(_ssh_argv(gw, app, "echo hi", [gw.client_key], source="127.0.0.2"))
    assert back.returncode == 0 and back.stdout == b"hi\n", back.stderr


def test_one_wrong_key_retried_behind_a_shared_address_locks_out_only_that_key(
    own_gateway: Gateway,
) -> None:
    # A CI job behind a NAT retries with a wrong key: the key is penalized from that
    # address; the others behind it (the right key) still get in.
    gw = _start(own_gateway, "penalty_failures = 3\npenalty_time = 60\n")
    app = gw.new_app()
    stranger = _wrong_keys(gw, 1)
    for _ in range(5):
        result = _run(_ssh_argv(gw, app, "true", stranger, source="127.0.0.5"))
        assert result.returncode == 255 and b"Permission denied" in result.stderr
    assert wait_until(
        lambda: _log_lines(gw, rf"key penalized app={app} key=SHA256:\S+ source=127\.0\.0\.5 "), 5
    )
    assert _log_lines(gw, r"key refused conn=\S+ .*source=127\.0\.0\.5 failures=1 penalty=")
    assert not _log_lines(gw, "source penalized")
    user = _run(_ssh_argv(gw, app, "echo hi", [gw.client_key], source="127.0.0.5"))
    assert user.returncode == 0 and user.stdout == b"hi\n", user.stderr


def test_exempt_sources_are_never_penalized(own_gateway: Gateway) -> None:
    gw = _start(
        own_gateway,
        'penalty_failures = 2\npenalty_time = 60\npenalty_exempt = ["127.0.0.6/32"]\n',
    )
    app = gw.new_app()
    strangers = _wrong_keys(gw, 4)
    for source in ("127.0.0.6", "127.0.0.7"):
        for stranger in strangers:
            _run(_ssh_argv(gw, app, "true", [stranger], source=source))
    assert wait_until(lambda: _log_lines(gw, "source penalized source=127.0.0.7 "), 5)
    assert not _log_lines(gw, "source penalized source=127.0.0.6 ")
    exempt = _run(_ssh_argv(gw, app, "echo hi", [gw.client_key], source="127.0.0.6"))
    assert exempt.returncode == 0 and exempt.stdout == b"hi\n", exempt.stderr
    assert (
        _run(_ssh_argv(gw, app, "echo hi", [gw.client_key], source="127.0.0.7")).returncode == 255
    )


def test_connections_that_never_try_a_key_penalize_their_address(own_gateway: Gateway) -> None:
    gw = _start(own_gateway, "penalty_failures = 3\npenalty_time = 60\n")
    app = gw.new_app()
    # A port probe that sends nothing and leaves is no failure...
    for _ in range(5):
        socket.create_connection(("127.0.0.1", gw.port), source_address=("127.0.0.9", 0)).close()
    # ...a client that speaks SSH and leaves without trying a key is.
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", gw.port), source_address=("127.0.0.8", 0)) as s:
            s.sendall(b"SSH-2.0-OpenSSH_9.2 scanner\r\n")
            s.settimeout(5)
            assert s.recv(64).startswith(b"SSH-2.0-")
    assert wait_until(lambda: _log_lines(gw, "source penalized source=127.0.0.8 "), 5)
    assert _run(_ssh_argv(gw, app, "true", [gw.client_key], source="127.0.0.8")).returncode == 255
    probed = _run(_ssh_argv(gw, app, "echo hi", [gw.client_key], source="127.0.0.9"))
    assert probed.returncode == 0 and probed.stdout == b"hi\n", probed.stderr


def test_a_user_whose_right_key_comes_later_is_not_penalized(own_gateway: Gateway) -> None:
    gw = _start(own_gateway, "penalty_failures = 2\npenalty_time = 60\n")
    app = gw.new_app()
    keys = [*_wrong_keys(gw, 3), gw.client_key]
    for _ in range(4):
        result = _run(_ssh_argv(gw, app, "echo hi", keys, source="127.0.0.4"))
        assert result.returncode == 0 and result.stdout == b"hi\n", result.stderr
    assert len(_log_lines(gw, r"key refused .* source=127\.0\.0\.4 failures=")) == 12
    assert not _log_lines(gw, "source penalized")


# -- per connection -----------------------------------------------------------------------


def test_max_auth_tries_closes_the_connection(own_gateway: Gateway) -> None:
    gw = _start(own_gateway, "max_auth_tries = 3\n")
    app = gw.new_app()
    strangers = _wrong_keys(gw, 5)
    result = _run(_ssh_argv(gw, app, "true", [*strangers, gw.client_key]))
    assert result.returncode == 255
    assert b"Too many authentication failures" in result.stderr
    refused = _log_lines(gw, r"key refused conn=\S+ app=\S+ key=SHA256:\S+ source=127\.0\.0\.1")
    assert len(refused) == 3  # the fourth key was never looked at
    assert _log_lines(gw, r"connection refused .*source=127\.0\.0\.1 reason=max_auth_tries")
    # Two wrong keys, then the right one: under the limit.
    result = _run(_ssh_argv(gw, app, "echo hi", [*strangers[:2], gw.client_key]))
    assert result.returncode == 0 and result.stdout == b"hi\n", result.stderr


def test_max_sessions_per_connection(own_gateway: Gateway) -> None:
    gw = _start(own_gateway, "max_sessions = 2\n")
    app = gw.new_app()

    async def scenario() -> None:
        async with gw.connect(app) as conn:
            first = await conn.create_process("sleep 60")
            second = await conn.create_process("sleep 60")
            with pytest.raises(asyncssh.ChannelOpenError) as refused:
                await conn.create_process("echo third")
            assert refused.value.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
            # A session that ends makes room for the next.
            first.close()
            await first.wait_closed()
            result = await conn.run("echo again", check=True)
            assert result.stdout == "again\n"
            second.close()

    asyncio.run(scenario())
    assert _log_lines(
        gw, r"session refused conn=\S+ app=\S+ source=127\.0\.0\.1 reason=max_sessions"
    )


def test_login_grace_time_drops_a_client_that_never_authenticates(
    own_gateway: Gateway,
) -> None:
    gw = _start(own_gateway, "login_grace_time = 2\n")
    app = gw.new_app()
    silent = socket.create_connection(("127.0.0.1", gw.port))
    chatty = socket.create_connection(("127.0.0.1", gw.port))
    chatty.sendall(b"SSH-2.0-OpenSSH_9.2 never-authenticates\r\n")
    started = time.monotonic()
    try:
        for sock in (silent, chatty):
            sock.settimeout(10)
            received = b""
            while chunk := sock.recv(4096):  # the banner, KEXINIT, then the close
                received += chunk
            assert received.startswith(b"SSH-2.0-")
        elapsed = time.monotonic() - started
    finally:
        silent.close()
        chatty.close()
    assert 1.5 <= elapsed < 5, elapsed
    # The first refusal in full; the second only counted, in the summary at shutdown.
    refused = r"connection refused conn=\S+ source=127\.0\.0\.1 reason=login_grace_time "
    assert wait_until(lambda: _log_lines(gw, refused + "listener=ssh app=- grace=2s"), 5)
    # An authenticating client is not affected by the short grace.
    assert _run(gw.ssh_argv(app, "sleep 3; echo still")).stdout == b"still\n"
    gw.stop()
    summary = r"connections refused source=127\.0\.0\.1 reason=login_grace_time .*count=2 "
    assert len(_log_lines(gw, refused)) == 1 and _log_lines(gw, summary)


# -- environment ----------------------------------------------------------------------------


def test_only_accepted_env_reaches_the_dyno(own_gateway: Gateway) -> None:
    gw = _start(own_gateway, "")  # default accept_env: LANG, LC_*, TZ
    app = gw.new_app()

    async def run(command: str) -> str:
        async with gw.connect(app) as conn:
            result = await conn.run(
                command,
                env={
                    "LANG": "de_DE.UTF-8",
                    "LC_TIME": "C.UTF-8",
                    "TZ": "Europe/Berlin",
                    "SECRET_TOKEN": "leaked",
                    "LD_PRELOAD": "/tmp/evil.so",
                },
                check=True,
            )
            return str(result.stdout)

    env = asyncio.run(run("env"))
    assert "LANG=de_DE.UTF-8\n" in env
    assert "LC_TIME=C.UTF-8\n" in env
    assert "TZ=Europe/Berlin\n" in env
    assert "SECRET_TOKEN" not in env and "evil" not in env
    assert _log_lines(gw, r"env refused app=\S+ conn=\S+ names=.*'SECRET_TOKEN'")
    # `run -e` is explicit and wins over what the client's environment says.
    assert asyncio.run(run("run -e LANG=fr_FR.UTF-8 echo $LANG")) == "fr_FR.UTF-8\n"

    # OpenSSH: SendEnv from the client's environment, SetEnv from its config.
    argv = gw.ssh_argv(app, "echo lang=$LANG tz=$TZ other=$OTHER_VAR")
    argv[1:1] = ["-o", "SendEnv=LANG OTHER_VAR", "-o", "SetEnv=TZ=UTC"]
    result = subprocess.run(
        argv,
        capture_output=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "OTHER_VAR": "nope"},
    )
    assert result.stdout == b"lang=C.UTF-8 tz=UTC other=\n", result.stderr


# -- algorithms ---------------------------------------------------------------------------


def test_ssh_audit_finds_no_failure(own_gateway: Gateway) -> None:
    gw = _start(own_gateway, "")
    ssh_audit = Path(sys.executable).with_name("ssh-audit")
    assert ssh_audit.exists(), "ssh-audit missing: pip install -e '.[test]'"
    result = subprocess.run(
        [str(ssh_audit), "-n", "-p", str(gw.port), "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    print(result.stdout)
    assert "[fail]" not in result.stdout
    # 0: all good; 2: warnings only: "not post-quantum" for the classical key exchanges,
    # kept for the clients without ML-KEM: OpenSSH before 9.9 (Debian 12 ships 9.2), PuTTY,
    # Dropbear, libssh, libssh2 (docs/clients.md);
    assert result.returncode in (0, 2), result.stdout + result.stderr
    warned = {line.split()[1] for line in result.stdout.splitlines() if "-- [warn]" in line}
    # and "encrypt-and-MAC" for hmac-sha2-256, offered last for Dropbear.
    assert warned <= {"curve25519-sha256", "curve25519-sha256@libssh.org", "curve448-sha512",
                      "diffie-hellman-group16-sha512", "hmac-sha2-256"}  # fmt: skip
    assert "chacha20-poly1305" not in result.stdout
    assert "(key) ssh-ed25519" in result.stdout and "(key) rsa-sha2-512" in result.stdout


# -- the front's bookkeeping, without sockets: a real store and audit trail, and a stand-in
# for asyncssh's connection object (not ours) ----------------------------------------------


class _FakeConn:
    def __init__(self, source: str, pending: Pending, spoke: bool) -> None:
        self.source = source
        self.extra = {
            "peername": (source, 40000),
            "admission": pending,
            "client_version": "SSH-2.0-OpenSSH_9.2" if spoke else None,
        }
        self.disconnects: list[tuple[int, str]] = []

    def get_extra_info(self, name: str) -> object:
        return self.extra.get(name)

    def disconnect(self, code: int, reason: str) -> None:
        self.disconnects.append((code, reason))


class _Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


Connect = Callable[..., tuple[GatewayServer, _FakeConn]]


def _front(
    tmp_path: Path, settings: dict[str, Any], keys: set[tuple[str, str]] | None = None
) -> tuple[PreAuthLimits, _Clock, Connect, list[str]]:
    """Pre-auth limits with a fake clock, a way to make GatewayServers that see
    stand-in connections from a source (admitted by a stand-in gate), and the ids of
    the connections settled with that gate, in order."""
    clock = _Clock()
    limits = PreAuthLimits(SSHSettings(**settings), clock=clock)
    store = SQLiteStore(tmp_path / "state.db")
    store.migrate()
    for app, fingerprint in keys or set():
        if store.get_app(app) is None:
            store.create_app(app)
        store.add_key(app, fingerprint, "ssh-ed25519 AAAA", "")
    services = SessionServices(
        manager=PathConnector(tmp_path / "manager.sock"),
        banner=False,
        idle_timeout=0,
        sessions=AttachedSessions(),
        observer=Observer(AuditLog(tmp_path / "audit.jsonl")),
    )

    async def check_key(app: str, fingerprint: str) -> bool:
        return store.has_key(app, fingerprint)  # what the manager answers CheckKey with

    settled: list[str] = []
    ids = iter(range(1, 1000))

    def connect(source: str = "192.0.2.7", spoke: bool = True) -> tuple[GatewayServer, _FakeConn]:
        pending = Pending(f"c{next(ids)}", source, (source, 40000), 0.0, settled.append)
        server = GatewayServer(services, limits, check_key)
        conn = _FakeConn(source, pending, spoke)
        server.connection_made(conn)  # type: ignore[arg-type]
        return server, conn

    return limits, clock, connect, settled


def valid(server: GatewayServer, app: str, key: asyncssh.SSHKey) -> bool:
    """asyncssh's question, answered as asyncssh awaits it."""
    return asyncio.run(server.validate_public_key(app, key))


_GOOD, _BAD = (asyncssh.generate_private_key("ssh-ed25519") for _ in range(2))
_GOOD_FP = _GOOD.get_fingerprint("sha256")


def test_each_refused_key_is_one_failure_and_the_limit_disconnects_once(tmp_path: Path) -> None:
    _, _, connect, _ = _front(tmp_path, {"max_auth_tries": 3}, {("app", _GOOD_FP)})
    server, conn = connect()
    server.begin_auth("app")
    for _ in range(2):
        assert not valid(server, "app", _BAD)
    assert not valid(server, "nope", _GOOD)  # unknown app: the same failure
    assert conn.disconnects == [
        (asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE, "Too many authentication failures")
    ]
    # Whatever comes after is refused, the right key too, with no second disconnect.
    assert not valid(server, "app", _GOOD)
    assert len(conn.disconnects) == 1


def test_a_key_query_and_its_signature_are_not_failures(tmp_path: Path) -> None:
    _, _, connect, _ = _front(tmp_path, {"max_auth_tries": 2}, {("app", _GOOD_FP)})
    server, conn = connect()
    assert valid(server, "app", _GOOD)  # the query
    assert valid(server, "app", _GOOD)  # the signature
    assert server._failures == 0
    # A third look at the same key: its signature failed; counted, answer unchanged.
    assert valid(server, "app", _GOOD)
    assert server._failures == 1 and not conn.disconnects


def test_admission_settles_once_and_failures_penalize(tmp_path: Path) -> None:
    limits, clock, connect, settled = _front(
        tmp_path, {"penalty_failures": 2, "penalty_time": 60}, {("app", _GOOD_FP)}
    )
    first, _ = connect()
    assert first.id == "c1" and first.source == "192.0.2.7"
    valid(first, "app", _GOOD)
    first.auth_completed()
    first.connection_lost(None)
    assert settled == ["c1"]  # at auth, once
    # A port probe (never spoke SSH, tried no key) leaves: settled, not a failure.
    probe, _ = connect(spoke=False)
    probe.connection_lost(None)
    assert settled == ["c1", "c2"] and limits.refusal("192.0.2.7") is None
    # The same wrong key twice: that key is penalized from there, the address is not.
    for _ in range(2):
        server, _ = connect()
        valid(server, "app", _BAD)
        server.connection_lost(None)
    assert limits.refusal("192.0.2.7") is None
    assert limits.key_refused("192.0.2.7", f"app {_BAD.get_fingerprint('sha256')}") == 60
    retry, _ = connect()
    assert not valid(retry, "app", _BAD)
    assert valid(retry, "app", _GOOD)  # the right key is still looked at
    retry.connection_lost(None)
    # Two connections that spoke SSH and tried no key: the address is penalized.
    for _ in range(2):
        connect()[0].connection_lost(None)
    reason, detail = limits.refusal("192.0.2.7") or ("", "")
    assert reason == "penalty" and detail == "remaining=60s"
    assert limits.refusal("192.0.2.8") is None  # another source
    clock.now += 61
    assert limits.refusal("192.0.2.7") is None  # served
    assert len(settled) == len(set(settled)) == 7
