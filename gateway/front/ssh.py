"""SSH authentication and session set-up: the user name is the app, keys are per app.

An unknown app and a wrong key look the same to the client: both are a refused key.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket

import asyncssh

from gateway.front.channel import adopt
from gateway.front.session import DynoSession, SessionContext
from gateway.store import Store

log = logging.getLogger("gateway.front")

_ids = itertools.count(1)


def connection_id() -> str:
    """Short, unique within this front process, and unguessable across restarts."""
    return f"{os.getpid():x}.{next(_ids)}"


class GatewayServer(asyncssh.SSHServer):
    def __init__(self, store: Store, context: dict[str, object]) -> None:
        self.store = store
        self.context = context
        self.id = connection_id()
        self.app = ""
        self._conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        peer = conn.get_extra_info("peername") or ("?", 0)
        sock = conn.get_extra_info("socket")
        if sock is not None and hasattr(socket, "TCP_QUICKACK"):
            # OpenSSH leaves Nagle on for non-PTY sessions; with our delayed ACK that
            # costs ~40 ms per round trip in the handshake.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        log.info("connection opened conn=%s peer=%s:%s", self.id, peer[0], peer[1])

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f" reason={exc}" if exc else ""
        log.info("connection closed conn=%s app=%s%s", self.id, self.app or "-", reason)

    def begin_auth(self, username: str) -> bool:
        self.app = username
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        fingerprint = key.get_fingerprint("sha256")
        accepted = self.store.has_key(username, fingerprint)
        if not accepted:
            log.info("key refused conn=%s app=%s key=%s", self.id, username, fingerprint)
        else:
            self._key = fingerprint
        return accepted

    def auth_completed(self) -> None:
        log.info(
            "auth accepted conn=%s app=%s key=%s", self.id, self.app, getattr(self, "_key", "?")
        )

    def session_requested(self) -> tuple[asyncssh.SSHServerChannel, DynoSession]:
        assert self._conn is not None
        channel = adopt(self._conn.create_server_channel(encoding=None))
        context = SessionContext(
            app=self.app,
            connection=self.id,
            store=self.store,
            **self.context,  # type: ignore[arg-type]
        )
        return channel, DynoSession(context)
