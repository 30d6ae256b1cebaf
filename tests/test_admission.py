"""Admission of unauthenticated connections (gateway/front/gate.py), end to end: real
OpenSSH clients, TLS and HTTP clients, and floods of held-open sockets from other
loopback addresses (127.0.1.x is one /24, the default netblock size). The rules'
arithmetic is tested without sockets in tests/test_prelimits.py.

Floods are bounded: at most 500 sockets (2000 short-lived ones for the audit bound),
all to loopback, all closed by the end of the test.
"""

from __future__ import annotations

import json
import resource
import selectors
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Gateway, wait_until
from tests.test_backpressure import gateway_pids, rss_bytes
from tests.test_ssh_limits import _log_lines, _run, _ssh_argv, _start

MB = 1024 * 1024


@pytest.fixture
def nofile() -> Iterator[None]:
    """Room for 500+ sockets here and in the gateway, which inherits the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _still_open(sock: socket.socket) -> bool:
    """Whether the server has not closed `sock` (without consuming anything)."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True  # nothing to read, not closed
    except ConnectionResetError:
        return False


def _open(port: int, sources: list[str], banner_every: int = 2) -> list[socket.socket]:
    """One connection from each of `sources` (loopback addresses); every
    `banner_every`-th sends an SSH client version line, the others nothing."""
    socks = []
    for i, source in enumerate(sources):
        sock = socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
        if banner_every and i % banner_every:
            sock.sendall(b"SSH-2.0-OpenSSH_9.2 held-open\r\n")
        socks.append(sock)
    return socks


def _answered(socks: list[socket.socket], within: float) -> set[int]:
    """The indexes of `socks` on which the server sent something (or closed) within
    `within` seconds, by one wait on all of them."""
    answered: set[int] = set()
    with selectors.DefaultSelector() as selector:
        for i, sock in enumerate(socks):
            selector.register(sock, selectors.EVENT_READ, i)
        deadline = time.monotonic() + within
        while (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                answered.add(key.data)
                selector.unregister(key.fileobj)
    return answered


def _closed_silently(sock: socket.socket, timeout: float) -> bool:
    """Whether the server closed `sock` without sending a byte."""
    sock.settimeout(timeout)
    try:
        return sock.recv(64) == b""
    except ConnectionResetError:
        return True


def _unauthenticated(gw: Gateway, listener: str) -> tuple[int, int]:
    """(in the handshake, waiting) on `listener`, from the gateway's own metrics."""
    url = f"http://127.0.0.1:{gw.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    found = {"handshake": 0, "waiting": 0}
    for family in text_string_to_metric_families(text):
        if family.name == "gateway_unauthenticated_connections":
            for sample in family.samples:
                if sample.labels["listener"] == listener:
                    found[sample.labels["state"]] = int(sample.value)
    return found["handshake"], found["waiting"]


def _held(gw: Gateway, listener: str, expected: tuple[int, int]) -> bool:
    return wait_until(lambda: _unauthenticated(gw, listener) == expected, 15)


@pytest.fixture
def closing() -> Iterator[list[socket.socket]]:
    """Sockets a test opens, closed however it ends."""
    socks: list[socket.socket] = []
    yield socks
    for sock in socks:
        sock.close()


# -- SSH ----------------------------------------------------------------------------------


def test_a_burst_of_200_all_succeed_while_a_flood_of_500_is_held_off(
    own_gateway: Gateway, nofile: None, closing: list[socket.socket]
) -> None:
    """Issue 11's burst and the flood protections, with the default settings, together:
    500 half-open connections from 127.0.1.x hold only their netblock's share of the
    handshake slots (30) and wait for the rest; a user from another address gets in
    within 2 s; then 200 concurrent `ssh APP@127.0.0.1 CMD` from one source all succeed
    while the flood is still held."""
    gw = _start(own_gateway, "")
    app = gw.new_app()
    pids = gateway_pids(gw)
    before = sum(rss_bytes(pid) for pid in pids)
    started = time.monotonic()
    closing += _open(gw.port, [f"127.0.1.{i % 250 + 1}" for i in range(500)])
    assert _held(gw, "ssh", (30, 470)), _unauthenticated(gw, "ssh")
    holding = sum(rss_bytes(pid) for pid in pids)

    login = time.monotonic()
    user = _run(_ssh_argv(gw, app, "echo in", [gw.client_key], source="127.0.2.1"))
    login_time = time.monotonic() - login
    assert user.returncode == 0 and user.stdout == b"in\n", user.stderr
    assert login_time < 2, login_time

    burst = time.monotonic()
    clients = [
        subprocess.Popen(
            gw.ssh_argv(app, f"echo {i}"), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for i in range(200)
    ]
    results = [client.communicate(timeout=300) for client in clients]
    burst_time = time.monotonic() - burst
    failed = [
        (i, client.returncode, err[-200:])
        for i, (client, (out, err)) in enumerate(zip(clients, results, strict=True))
        if client.returncode != 0 or out != f"{i}\n".encode()
    ]
    assert not failed, f"{len(failed)} of 200 failed: {failed[:5]}"
    flood_time = time.monotonic() - started
    print(
        f"flood of 500 held in {holding / MB - before / MB:+.1f} MB; user in after "
        f"{login_time:.3f} s; 200 concurrent logins in {burst_time:.1f} s "
        f"({flood_time:.1f} s since the flood began)"
    )
    # The flood was held, not dropped: nothing from 127.0.1.x was refused but for running
    # out its time (it waits up to login_grace_time, 30 s), and it kept its 30 slots.
    dropped = r"connection refused .*source=127\.0\.1\.\S+ reason=(?!wait_timeout|login_grace)"
    assert not _log_lines(gw, dropped)
    if flood_time < 25:
        assert _unauthenticated(gw, "ssh") == (30, 470)
        assert all(_still_open(sock) for sock in closing)
    assert not _log_lines(gw, r"connection refused .*source=127\.0\.0\.1 ")
    # 500 held connections cost the gateway (manager + front) under 32 MB.
    assert holding - before < 32 * MB


def test_one_address_holds_at_most_its_share_of_the_slots(
    own_gateway: Gateway, nofile: None, closing: list[socket.socket]
) -> None:
    """Issue 12, item 5: 300 half-open connections from 127.0.1.1 used to leave 2 of 20
    logins from another address getting in. Now the address gets 10 handshake slots (the
    rest wait, sent nothing), and every login from elsewhere, its /24 included, gets in."""
    gw = _start(own_gateway, "")
    app = gw.new_app()
    closing += _open(gw.port, ["127.0.1.1"] * 300, banner_every=0)
    assert _held(gw, "ssh", (10, 290)), _unauthenticated(gw, "ssh")
    answered = _answered(closing, within=2)
    assert len(answered) == 10  # the first ten, and only they, got the server's banner
    assert answered == set(range(10))
    for sock in closing[:10]:
        assert sock.recv(64).startswith(b"SSH-2.0-")
    for source in [f"127.0.1.{2 + i}" for i in range(10)] + [f"127.0.2.{i}" for i in range(10)]:
        result = _run(_ssh_argv(gw, app, "echo ok", [gw.client_key], source=source))
        assert result.returncode == 0 and result.stdout == b"ok\n", (source, result.stderr)
    assert _unauthenticated(gw, "ssh") == (10, 290)
    # Once the flood leaves, every slot and place is given back.
    for sock in closing:
        sock.close()
    assert _held(gw, "ssh", (0, 0)), _unauthenticated(gw, "ssh")


def test_over_its_share_a_connection_waits_and_is_served_in_order(
    own_gateway: Gateway, closing: list[socket.socket]
) -> None:
    # 4 handshake slots in all; waiting is bounded by login_grace_time.
    gw = _start(
        own_gateway,
        'max_startups = "4"\nper_source_max_startups = 0\nper_netblock_max_startups = 0\n'
        "login_grace_time = 4\n",
    )
    app = gw.new_app()
    closing += _open(gw.port, ["127.0.0.1"] * 10, banner_every=0)
    arrived = time.monotonic()
    assert _held(gw, "ssh", (4, 6))
    assert _answered(closing, within=1) == {0, 1, 2, 3}
    # A waiting client that gives up gives up its place.
    closing[9].close()
    assert _held(gw, "ssh", (4, 5))
    # The handshake slots free well before the waiters' login_grace_time runs out (so
    # the last waiter's timeout never races a slot's), in two pairs: the connections
    # that waited longest get them, and their banners.
    time.sleep(max(0.0, arrived + 1.0 - time.monotonic()))
    closing[0].close()
    closing[1].close()
    assert _answered(closing[4:9], within=1) == {0, 1}  # sockets 4 and 5
    closing[2].close()
    closing[3].close()
    assert _answered(closing[6:8], within=1) == {0, 1}  # sockets 6 and 7
    assert _held(gw, "ssh", (4, 1))
    # The last one waits out login_grace_time and is closed, having been sent nothing.
    assert _closed_silently(closing[8], 10)
    waited = time.monotonic() - arrived
    assert 3 < waited < 8, waited
    assert _log_lines(gw, r"connection refused conn=\S+ source=127\.0\.0\.1 reason=wait_timeout")
    # A client with a slot authenticates as ever.
    for sock in closing:
        sock.close()
    assert _held(gw, "ssh", (0, 0))
    assert _run(gw.ssh_argv(app, "echo fine")).stdout == b"fine\n"


def test_a_netblock_full_of_waiting_connections_makes_room_for_its_neighbours(
    own_gateway: Gateway, closing: list[socket.socket]
) -> None:
    gw = _start(own_gateway, "per_netblock_max_pending = 50\n")
    app = gw.new_app()
    closing += _open(gw.port, ["127.0.1.1"] * 60, banner_every=0)
    assert _held(gw, "ssh", (10, 40))
    refused = r"connection refused conn=\S+ source=127\.0\.1\.1 reason=per_netblock_max_pending"
    assert wait_until(lambda: _log_lines(gw, refused), 5)
    assert len(_answered(closing[50:], within=1)) == 10  # the ten over the cap: closed
    # A neighbour in the /24 takes the place of 127.0.1.1's newest waiting connection.
    result = _run(_ssh_argv(gw, app, "echo neighbour", [gw.client_key], source="127.0.1.2"))
    assert result.returncode == 0 and result.stdout == b"neighbour\n", result.stderr
    assert _log_lines(gw, r"connection refused conn=\S+ source=127\.0\.1\.1 reason=displaced")
    assert 49 in _answered(closing[:50], within=1)


# -- rendezvous and API -----------------------------------------------------------------


def _tls_context(gw: Gateway) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(gw.root / "keys" / "rendezvous-ca.pem"))


def _tls_handshake(gw: Gateway, source: str, timeout: float) -> float:
    """Seconds a TLS handshake with the rendezvous port took from `source`."""
    started = time.monotonic()
    raw = socket.create_connection(
        ("127.0.0.1", gw.rendezvous_port), timeout=timeout, source_address=(source, 0)
    )
    with _tls_context(gw).wrap_socket(raw, server_hostname="127.0.0.1"):
        return time.monotonic() - started


def _http_status(port: int, source: str, timeout: float) -> int:
    """The status of GET /account (no token: 401) from `source`."""
    with socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
    ) as sock:
        sock.sendall(b"GET /account HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    return int(answer.split()[1])


def test_the_rendezvous_and_api_listeners_cap_unauthenticated_connections(
    own_gateway: Gateway, nofile: None, closing: list[socket.socket]
) -> None:
    gw = _start(own_gateway, "")
    gw.new_app()
    rendezvous = _open(gw.rendezvous_port, ["127.0.1.1"] * 300, banner_every=0)
    api = _open(gw.api_port, ["127.0.1.1"] * 300, banner_every=0)
    closing += rendezvous + api
    assert _held(gw, "rendezvous", (10, 290)), _unauthenticated(gw, "rendezvous")
    assert _held(gw, "api", (10, 290)), _unauthenticated(gw, "api")
    # Others are served at once.
    assert _tls_handshake(gw, "127.0.2.1", timeout=5) < 2
    assert _http_status(gw.api_port, "127.0.0.1", timeout=5) == 401
    # The flooding address's next connection waits: no TLS handshake, no HTTP answer...
    with pytest.raises(TimeoutError):
        _tls_handshake(gw, "127.0.1.1", timeout=1)
    waiting = socket.create_connection(
        ("127.0.0.1", gw.api_port), timeout=10, source_address=("127.0.1.1", 0)
    )
    closing.append(waiting)
    waiting.sendall(b"GET /account HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert not _answered([waiting], within=1)
    # ...until the flood goes: then it is answered, not dropped.
    for sock in rendezvous + api:
        sock.close()
    assert waiting.recv(100).startswith(b"HTTP/1.1 401 ")
    assert _tls_handshake(gw, "127.0.1.1", timeout=5) < 5
    # Every slot and place is given back once the clients are gone.
    waiting.close()
    assert _held(gw, "rendezvous", (0, 0)), _unauthenticated(gw, "rendezvous")
    assert _held(gw, "api", (0, 0)), _unauthenticated(gw, "api")


# -- the audit trail under a refused flood ----------------------------------------------


def test_a_refused_flood_leaves_a_bounded_audit_trail(own_gateway: Gateway) -> None:
    gw = _start(own_gateway, "penalty_failures = 2\npenalty_time = 120\n")
    # Two connections that speak SSH and leave without trying a key: penalized.
    for _ in range(2):
        with socket.create_connection(
            ("127.0.0.1", gw.port), source_address=("127.0.0.10", 0)
        ) as s:
            s.sendall(b"SSH-2.0-OpenSSH_9.2 probe\r\n")
            s.settimeout(5)
            assert s.recv(64).startswith(b"SSH-2.0-")
    assert wait_until(lambda: _log_lines(gw, "source penalized source=127.0.0.10 "), 5)
    audit = gw.state_dir / "audit.jsonl"
    size_before = audit.stat().st_size
    refused = 0
    for _ in range(2000):
        with socket.create_connection(
            ("127.0.0.1", gw.port), source_address=("127.0.0.10", 0)
        ) as s:
            s.settimeout(5)
            try:
                refused += s.recv(64) == b""
            except ConnectionResetError:
                refused += 1
    assert refused == 2000
    grown = audit.stat().st_size - size_before
    gw.stop()  # writes the summary of the interval
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    mine = [e for e in events if e.get("source") == "127.0.0.10" and "refused" in e["event"]]
    assert [e["event"] for e in mine] == ["connect_refused", "connect_refused_summary"]
    assert mine[0]["reason"].startswith("penalty") and mine[1]["count"] == 2000
    assert grown < 1000, grown  # one event for 2000 refusals
    logged = _log_lines(gw, r"connection refused .*source=127\.0\.0\.10 ")
    assert len(logged) == 1
    assert _log_lines(gw, r"connections refused source=127\.0\.0\.10 reason=penalty .*count=2000")
