"""`[ssh] proxy_protocol = true`: behind HAProxy's send-proxy-v2, the client address in
the PROXY header is the connection's source (audit, logs, penalties); a connection
without a valid header is closed. The real OpenSSH client, through a relay that sends
the header as HAProxy does (tests/test_cluster.py has HAProxy itself)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.core.proxy_protocol import build
from tests.conftest import REPO, Gateway, _gateway, wait_until


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[Gateway]:
    gw = _gateway(tmp_path / "gw")
    gw.ssh_config = "proxy_protocol = true\npenalty_failures = 2\npenalty_time = 60\n"
    gw.write_config()
    gw.start()
    yield gw
    gw.stop()


def _via(
    gw: Gateway, client_ip: str, app: str, *command: str, key: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    relay = f"{sys.executable} -m tests.proxy_relay 127.0.0.1 {gw.port} {client_ip}"
    argv = gw.ssh_argv(app, *command, key=key)
    argv[1:1] = ["-o", f"ProxyCommand={relay}"]
    return subprocess.run(argv, capture_output=True, timeout=60, cwd=REPO)


def _audit(gw: Gateway) -> list[dict[str, object]]:
    lines = (gw.state_dir / "audit.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_the_header_names_the_source_in_the_audit_trail_and_the_log(proxied: Gateway) -> None:
    app = proxied.new_app()
    done = _via(proxied, "198.18.0.7", app, "echo hi from $DYNO")
    assert (done.returncode, done.stdout) == (0, b"hi from run.1\n"), done.stderr
    connects = [e for e in _audit(proxied) if e["event"] == "connect"]
    assert [e["source"] for e in connects] == ["198.18.0.7"]
    auth = [e for e in _audit(proxied) if e["event"] == "auth" and e.get("app") == app]
    assert auth and all(e["source"] == "198.18.0.7" for e in auth)
    assert any("connection opened" in line and "peer=198.18.0.7:" in line for line in proxied.log)


def test_penalties_count_the_address_the_header_names(proxied: Gateway, tmp_path: Path) -> None:
    app = proxied.new_app()
    for i in range(2):  # penalty_failures = 2, each a key of its own (a repeat weighs less)
        stranger = tmp_path / f"stranger{i}"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)],
                       check=True)  # fmt: skip
        assert _via(proxied, "198.18.0.9", app, "true", key=stranger).returncode == 255
    assert wait_until(
        lambda: any("source penalized source=198.18.0.9" in x for x in proxied.log), 5
    )
    # The penalized address is refused even with a good key; another one is not, though
    # both come through the same proxy connection address (127.0.0.1).
    assert _via(proxied, "198.18.0.9", app, "true").returncode == 255
    assert _via(proxied, "198.18.0.10", app, "echo ok").stdout == b"ok\n"


def test_a_connection_without_a_valid_header_is_closed(proxied: Gateway) -> None:
    app = proxied.new_app()
    plain = proxied.ssh(app, "true")
    assert plain.returncode == 255
    assert plain.stdout == b""
    # Bytes that are no header: closed at once, with no SSH banner sent.
    for first in (b"SSH-2.0-OpenSSH_9.2\r\n", build(("10.0.0.1", 1))[:12] + b"\x11\x11\x00\x0c"):
        with socket.create_connection(("127.0.0.1", proxied.port), timeout=5) as sock:
            sock.sendall(first)
            assert _read_all(sock) == b""
    # Silence: closed after the header's deadline (5 s).
    with socket.create_connection(("127.0.0.1", proxied.port), timeout=10) as sock:
        started = time.monotonic()
        assert _read_all(sock) == b""
        assert 4 < time.monotonic() - started < 9
    # (The log says the first of each reason per interval, then a count: core/refusals.py.)
    refused = [line for line in proxied.log if "connection refused" in line]
    assert any("reason=proxy_header " in line and "signature" in line for line in refused)
    assert any("reason=proxy_header_timeout" in line for line in refused)
    # No session, no connect event: nothing reached admission.
    assert not [e for e in _audit(proxied) if e["event"] == "connect"]


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data
