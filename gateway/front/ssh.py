"""SSH authentication and session set-up: the user name is the app, keys are per app.
The user `APP.DYNO` addresses the running dyno DYNO of APP (docs/exec.md), with APP's
keys: its sessions run inside that dyno, and only it takes forwarded connections.

An unknown app and a wrong key look the same to the client: both are a refused key.
Before authentication: admission (gateway/front/gate.py: who may start a handshake, who
waits), then the OpenSSH-style limits of gateway/core/prelimits.py: a per-source (and
per key and source) penalty, max auth tries and, once in, max sessions per connection.
Each refusal is one log line with its reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import asyncssh

from gateway.config import SSHSettings
from gateway.core import protocol as p
from gateway.core.admission import parse_networks
from gateway.core.dyno_access import Login, forward_addresses
from gateway.core.prelimits import Penalized, PenaltyBox
from gateway.eventlog import event_log
from gateway.front.channel import adopt, adopt_tcp
from gateway.front.connection import ServerConnection
from gateway.front.forward import ForwardedConnection, Refusal, open_forward
from gateway.front.gate import Pending, Start, connection_id, feed
from gateway.front.link import Connector, ManagerLink
from gateway.front.observe import Observer
from gateway.front.ssh_session import SessionServices, SSHSession
from gateway.ipc import ManagerError, ManagerRefused

log = logging.getLogger(__name__)

# Offered algorithms (docs/configuration.md, "Algorithms"; what each common client picks:
# docs/clients.md): nothing ssh-audit fails (no NIST curves, SHA-1, GEX or small groups;
# one 4096-bit DH group as the fallback, since each DH kex is costly for the server), and
# no chacha20-poly1305: the client's order picks, OpenSSH's puts chacha20 first, and it
# costs asyncssh ~1.5x the CPU of AES here (AES-NI); OpenSSH uses aes128-ctr + umac-128-etm.
# Two concessions to Dropbear's dbclient (2022.83), which has no ETM MAC and no AES-GCM:
# - hmac-sha2-256 (encrypt-and-MAC; ssh-audit warns), last. Its only other way in is
#   chacha20, which OpenSSH would then pick. PuTTY and paramiko list it before its ETM
#   form and take it too (with AES-CTR, where encrypt-and-MAC is sound).
# - curve25519-sha256 first: dbclient sends a guessed kex packet for its first kex and, as
#   RFC 4253 says, counts the guess wrong unless that is the server's first too; asyncssh
#   counts it right whenever it is the agreed kex. They disagree and the kex fails. The
#   server's order picks nothing else: mlkem768x25519 is still chosen by clients that
#   prefer it.
ALGORITHMS: dict[str, list[str]] = {
    "kex_algs": [
        "curve25519-sha256",
        "mlkem768x25519-sha256",
        "curve25519-sha256@libssh.org",
        "curve448-sha512",
        "diffie-hellman-group16-sha512",
    ],
    "encryption_algs": [
        "aes128-gcm@openssh.com",
        "aes256-gcm@openssh.com",
        "aes128-ctr",
        "aes192-ctr",
        "aes256-ctr",
    ],
    "mac_algs": [
        "umac-128-etm@openssh.com",
        "hmac-sha2-256-etm@openssh.com",
        "hmac-sha2-512-etm@openssh.com",
        "hmac-sha2-256",
    ],
}
# Host key signatures: RSA keys sign with SHA-2 only (ssh-rsa is SHA-1).
HOST_KEY_ALGORITHMS = (b"ssh-ed25519", b"rsa-sha2-512", b"rsa-sha2-256")
LOGIN_TIMEOUT = "Login timeout expired"
UNAVAILABLE = (
    "the gateway is restarting; try again in a moment"  # asyncssh's reason when login_timeout fires
)
_PLAIN = re.compile(r"[A-Za-z0-9._@+-]{1,100}")


def shown(name: str) -> str:
    """A client-chosen name (the user name before auth) as a log line may show it: as is
    when plain, else quoted, so it cannot forge a line or a field."""
    return name if _PLAIN.fullmatch(name) else repr(name[:100])


def load_host_keys(keys: Sequence[bytes]) -> list[asyncssh.SSHKeyPair]:
    """The host keys (private keys' text, handed over by the manager), each offering
    only the signature algorithms in HOST_KEY_ALGORITHMS (asyncssh has no server option
    for this; it offers what each key pair lists)."""
    keypairs = asyncssh.load_keypairs(list(keys))
    for keypair in keypairs:
        allowed = [alg for alg in keypair.host_key_algorithms if alg in HOST_KEY_ALGORITHMS]
        keypair.host_key_algorithms = allowed
    return [keypair for keypair in keypairs if keypair.host_key_algorithms]


class PreAuthLimits:
    """Front-wide state behind the pre-auth limits: which sources (and keys from a
    source) are penalized, and the per-connection limits. One per SSH listener."""

    def __init__(self, settings: SSHSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.penalties = PenaltyBox(
            settings.penalty_failures,
            settings.penalty_time,
            exempt=parse_networks(settings.penalty_exempt),
        )
        self.max_auth_tries = settings.max_auth_tries
        self.max_sessions = settings.max_sessions
        self.login_grace_time = settings.login_grace_time
        self._clock = clock

    def refusal(self, source: str) -> tuple[str, str] | None:
        """Why a new connection from `source` is refused before it counts (reason,
        detail), or None."""
        remaining = self.penalties.refused_for(source, self._clock())
        return ("penalty", f"remaining={remaining:.0f}s") if remaining else None

    def key_refused(self, source: str, key: str) -> float:
        """Seconds `key` (`APP FINGERPRINT`) is still refused from `source`."""
        return self.penalties.key_refused_for(source, key, self._clock())

    def failed(self, source: str, keys: Iterable[str]) -> Penalized:
        """A connection from `source` ended without authenticating after trying `keys`
        (none: it never tried one); the penalties that starts."""
        return self.penalties.failure(source, self._clock(), keys)


def start_ssh(options: asyncssh.SSHServerConnectionOptions) -> Start:
    """The SSH listener's hand-over (gateway/front/gate.py): an admitted connection gets
    its asyncssh connection now, as asyncssh's own listener would make it on accept (so
    its version exchange and login timer start now), with its admission in extra info."""

    def start(transport: asyncio.Transport, pending: Pending, early: bytes) -> None:
        conn = ServerConnection(asyncio.get_running_loop(), options)
        conn.set_extra_info(admission=pending)
        transport.set_protocol(conn)
        conn.connection_made(transport)
        feed(conn, early)
        transport.resume_reading()

    return start


# Whether a key (SHA256 fingerprint) may log in to an app: the manager's answer.
KeyCheck = Callable[[str, str], Awaitable[bool]]


def ask_manager(manager: Connector) -> KeyCheck:
    """Key checks through the manager (the front holds no database)."""

    async def check(app: str, fingerprint: str) -> bool:
        async with await ManagerLink.open(manager) as link:
            return await link.check_key(app, fingerprint)

    return check


class GatewayServer(asyncssh.SSHServer):
    def __init__(
        self, services: SessionServices, limits: PreAuthLimits, check_key: KeyCheck
    ) -> None:
        self.check_key = check_key
        self.services = services
        self.limits = limits
        self.id = "?"
        self.app = ""
        self.login = Login("", None)
        self.source = "?"
        self._conn: asyncssh.SSHServerConnection | None = None
        self._key = "?"
        self._pending: Pending | None = None  # its admission, until authenticated
        self._authenticated = False
        self._failures = 0
        self._tried: set[str] = set()  # refused "APP FINGERPRINT"s, for the penalty
        self._closing = False  # max_auth_tries reached: nothing more is accepted
        self._store_unavailable = False  # the key could not be checked (database, manager)
        self._looks: dict[str, int] = {}  # accepted "app key" -> times validated
        self._sessions = 0
        self.observer: Observer = services.observer

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._pending = conn.get_extra_info("admission")
        peer = conn.get_extra_info("peername") or ("?", 0)
        if self._pending is not None:
            # The gate's: the client's address, also when a proxy told it.
            self.id, self.source, peer = (
                self._pending.conn,
                self._pending.source,
                self._pending.peer,
            )
        else:  # not through a gate
            self.id, self.source = connection_id(), str(peer[0])
        sock = conn.get_extra_info("socket")
        if sock is not None and hasattr(socket, "TCP_QUICKACK"):
            # OpenSSH leaves Nagle on for non-PTY sessions; with our delayed ACK that
            # costs ~40 ms per round trip in the handshake.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            # The kernel leaves quick-ACK mode by itself: re-arm it for each read
            # (`ssh host true`: 113 -> 39 ms, docs/benchmarks.md).
            received = conn.data_received

            def data_received(data: bytes, *args: Any) -> None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                received(data, *args)

            # Wraps asyncssh's own method, for this connection only.
            conn.data_received = data_received  # type: ignore[method-assign,assignment]
        waited = f" waited={self._pending.waited:.1f}s" if self._pending else ""
        log.info("connection opened conn=%s peer=%s:%s%s", self.id, peer[0], peer[1], waited)
        self.observer.connected(self.id, self.source)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._pending is not None:
            self._pending.settle()
            self._pending = None
        if not self._authenticated and not self._store_unavailable:
            timed_out = isinstance(exc, asyncssh.ConnectionLost) and exc.reason == LOGIN_TIMEOUT
            if timed_out:
                detail = f"app={shown(self.app or '-')} grace={self.limits.login_grace_time}s"
                self.observer.refused("ssh", self.id, self.source, "login_grace_time", detail)
            self._penalize(timed_out)
        reason = f" reason={exc}" if exc else ""
        log.info(
            "connection closed conn=%s app=%s source=%s%s",
            self.id, shown(self.app or "-"), self.source, reason,
        )  # fmt: skip

    def _penalize(self, timed_out: bool) -> None:
        """A connection ended without authenticating. It counts against its source if it
        tried keys (each key counted per source), or, without keys, if it spoke SSH (a
        version line) or ran out its login grace: a flood of half-open connections. A
        port probe that sends nothing and leaves is no failure."""
        spoke = self._conn is not None and self._conn.get_extra_info("client_version")
        if not (self._tried or spoke or timed_out):
            return
        penalized = self.limits.failed(self.source, self._tried)
        for key in penalized.keys:
            app, fingerprint = key.rsplit(" ", 1)
            log.info(
                "key penalized app=%s key=%s source=%s penalty_time=%ds",
                app, fingerprint, self.source, self.limits.penalties.window,
            )  # fmt: skip
        if penalized.source:
            log.info(
                "source penalized source=%s penalty_failures=%d penalty_time=%ds",
                self.source, self.limits.penalties.failures, self.limits.penalties.window,
            )  # fmt: skip

    def begin_auth(self, username: str) -> bool:
        self.login = Login.parse(username)
        self.app = username
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        # `APP.DYNO` logs in with APP's keys: another app's dyno refuses this app's key
        # exactly as that app refuses it.
        username = Login.parse(username).app
        fingerprint = key.get_fingerprint("sha256")
        seen = f"{shown(username)} {fingerprint}"
        penalty = self.limits.key_refused(self.source, seen)
        if penalty:
            self._failed(username, fingerprint, "key refused", f" penalty={penalty:.0f}s")
            return False
        try:
            allowed = await self.check_key(username, fingerprint)
        except p.LocalProtocolError:  # no app could have this name (empty, too long)
            allowed = False
        except ManagerError as exc:
            # Not the client's fault (the database or the manager is down): no failure
            # counted, and it is told why (OpenSSH prints the disconnect message).
            log.error(
                "key check failed conn=%s app=%s source=%s error=%s",
                self.id, shown(username), self.source, exc,
            )  # fmt: skip
            reason = str(exc) if isinstance(exc, ManagerRefused) else UNAVAILABLE
            self._store_unavailable = True  # no penalty for what the client did not do
            if self._conn is not None:
                self._conn.disconnect(asyncssh.DISC_SERVICE_NOT_AVAILABLE, reason)
            return False
        if allowed:
            # asyncssh asks once for a key query and once more for its signature, which
            # it checks after us: a third ask means a signature failed.
            looks = self._looks[seen] = self._looks.get(seen, 0) + 1
            if looks > 2:
                self._failed(username, fingerprint, "bad signature")
            self._key = fingerprint
            return not self._closing
        self._failed(username, fingerprint, "key refused")
        return False

    def _failed(self, username: str, fingerprint: str, what: str, detail: str = "") -> None:
        """One failed attempt; past max_auth_tries the connection is closed."""
        self._failures += 1
        self._tried.add(f"{shown(username)} {fingerprint}")
        log.info(
            "%s conn=%s app=%s key=%s source=%s failures=%d%s",
            what, self.id, shown(username), fingerprint, self.source, self._failures, detail,
        )  # fmt: skip
        self.observer.authenticated(self.id, shown(username), fingerprint, self.source, False)
        limit = self.limits.max_auth_tries
        if limit and self._failures >= limit and self._conn is not None and not self._closing:
            self._closing = True
            log.info(
                "connection refused conn=%s app=%s source=%s reason=max_auth_tries failures=%d",
                self.id, shown(username), self.source, self._failures,
            )  # fmt: skip
            self._conn.disconnect(
                asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE, "Too many authentication failures"
            )

    def auth_completed(self) -> None:
        self._authenticated = True
        self.app = self.login.app
        if self._pending is not None:
            self._pending.settle()
            self._pending = None
        into = f" dyno={shown(self.login.dyno)}" if self.login.dyno is not None else ""
        log.info(
            "auth accepted conn=%s app=%s key=%s source=%s%s",
            self.id, self.app, self._key, self.source, into,
        )  # fmt: skip
        self.observer.authenticated(self.id, self.app, self._key, self.source, True)

    def session_requested(self) -> tuple[asyncssh.SSHServerChannel[bytes], SSHSession]:
        assert self._conn is not None
        limit = self.limits.max_sessions
        if limit and self._sessions >= limit:
            log.info(
                "session refused conn=%s app=%s source=%s reason=max_sessions sessions=%d",
                self.id, self.app, self.source, self._sessions,
            )  # fmt: skip
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                f"at most {limit} sessions per connection",
            )
        channel = adopt(self._conn.create_server_channel(encoding=None))
        self._sessions += 1
        session = SSHSession(
            self.app, self.id, self.services, ended=self._session_ended, dyno=self.login.dyno
        )
        return channel, session

    def _session_ended(self) -> None:
        self._sessions -= 1

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> tuple[asyncssh.SSHTCPChannel[bytes], Any]:
        """A direct-tcpip channel (`ssh -L`, `-D`): only into a running dyno (the user
        `APP.DYNO`), only to its own loopback. ChannelOpenError says why not."""
        assert self._conn is not None
        dyno = self.login.dyno
        target = f"{dest_host}:{dest_port}"
        addresses = forward_addresses(dest_host)
        if dyno is None or self.login.dyno_problem() is not None:
            why = (
                "port forwarding reaches into a running dyno only: "
                f"ssh -L PORT:localhost:PORT {self.app}.run.N@HOST"
            )
        elif addresses is None or not 0 < dest_port < 65536:
            why = f"only localhost of {dyno} is reachable, not {dest_host[:100]}"
        else:
            why = None
        if why is not None:
            log.info(
                "forward refused conn=%s app=%s target=%s reason=%r",
                self.id, self.app, shown(target), why,
            )  # fmt: skip
            self.observer.forward_refused(self.id, self.app, dyno, target[:300], why)
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, why)
        assert dyno is not None and addresses is not None
        request = p.Forward(self.app, dyno, addresses[0], dest_port, self.id)
        channel = adopt_tcp(self._conn.create_tcp_channel())
        return channel, self._forward(request, addresses, dest_host, f"{orig_host}:{orig_port}")

    async def _forward(
        self, request: p.Forward, addresses: tuple[str, ...], host: str, source: str
    ) -> ForwardedConnection:
        target = f"{host}:{request.port}"
        forward_log = event_log(__name__, app=self.app, dyno=request.dyno, conn=self.id)
        try:
            link, fd = await open_forward(self.services.manager, request, addresses, host)
        except Refusal as exc:
            forward_log.info("forward refused target=%s reason=%r", target, str(exc))
            self.observer.forward_refused(self.id, self.app, request.dyno, target, str(exc))
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, str(exc)) from None
        forward_log.info("forward open target=%s source=%s", target, source)
        trace = self.observer.forward(self.id, self.app, request.dyno, target, source)
        return ForwardedConnection(link, fd, trace, forward_log)
