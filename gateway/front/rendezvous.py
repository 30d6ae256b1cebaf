"""Port 5000: the rendezvous that pairs a heroku CLI with the dyno it asked the API for.

A POST /apps/APP/dynos with attach reserves run.N in the manager and gets a secret here
(random, single use, valid for attach_timeout). The CLI connects with TLS and sends the
secret; we answer `rendezvous\\r\\n` and the dyno starts, its stdout and stderr merged
onto the socket. A garbage, wrong, expired or reused secret: the connection is closed,
nothing is said. At the end we send the CLI's exit-status marker with the true status.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.core.protocol import DynoInfo, Pty
from gateway.core.rendezvous import GREETING, BadHandshake, exit_marker, read_secret
from gateway.eventlog import event_log
from gateway.front.attached import AttachedSessions
from gateway.front.attachment import Attachment, Client
from gateway.front.link import ManagerLink
from gateway.front.observe import Observer, SessionTrace
from gateway.ipc import ManagerError

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10  # seconds for a client to send its secret line (at most attach_timeout)


@dataclass
class PendingAttach:
    """A dyno reserved through the API, waiting for its client on this port."""

    app: str
    dyno: DynoInfo
    link: ManagerLink
    pty: Pty | None
    expiry: asyncio.TimerHandle | None = None


class Rendezvous:
    """The dynos waiting for their client, by a hash of their secret."""

    def __init__(
        self, attach_timeout: int, idle_timeout: int, sessions: AttachedSessions, observer: Observer
    ) -> None:
        self.attach_timeout = attach_timeout
        self.idle_timeout = idle_timeout
        self.sessions = sessions
        self.observer = observer
        self._pending: dict[str, PendingAttach] = {}

    def add(self, pending: PendingAttach) -> str:
        """Register a reserved dyno; the secret for its attach_url."""
        secret = secrets.token_urlsafe(24)  # 192 bits
        key = _key(secret)
        loop = asyncio.get_running_loop()
        pending.expiry = loop.call_later(self.attach_timeout, self._expire, key)
        self._pending[key] = pending
        return secret

    def claim(self, secret: str) -> PendingAttach | None:
        """The dyno for `secret`, once: a claimed secret is gone."""
        pending = self._pending.pop(_key(secret), None)
        if pending is not None and pending.expiry is not None:
            pending.expiry.cancel()
        return pending

    def _expire(self, key: str) -> None:
        pending = self._pending.pop(key, None)
        if pending is not None:
            # The manager sees the link close before any attach: R13, status 128.
            log.info("no client attached app=%s dyno=%s", pending.app, pending.dyno.name)
            pending.link.close()

    def close(self) -> None:
        for key in list(self._pending):
            self._expire(key)


def _key(secret: str) -> str:
    # Looked up by hash, so the lookup's timing says nothing about the secret.
    return hashlib.sha256(secret.encode()).hexdigest()


class RendezvousProtocol(asyncio.Protocol):
    def __init__(
        self,
        rendezvous: Rendezvous,
        admitted: Callable[[], None] = lambda: None,
        peer: tuple[Any, ...] | None = None,
    ) -> None:
        """`admitted` is called once the client has shown a valid secret or has gone
        (it frees the connection's admission slot, gateway/front/gate.py); `peer` is the
        client's address when a proxy told it (else the connection's own)."""
        self.rendezvous = rendezvous
        self._peer = peer
        self._admitted = admitted
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._attachment: Attachment | None = None
        self._pending: PendingAttach | None = None
        self._task: asyncio.Task[None] | None = None
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._trace: SessionTrace | None = None
        self.log = event_log(__name__, conn="rendezvous")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peer = self._peer or transport.get_extra_info("peername") or ("?", 0)
        self.log = self.log.bind(peer=f"{peer[0]}:{peer[1]}")
        loop = asyncio.get_running_loop()
        timeout = min(HANDSHAKE_TIMEOUT, self.rendezvous.attach_timeout)
        self._handshake_timer = loop.call_later(timeout, self._refuse, "no secret sent")

    def data_received(self, data: bytes) -> None:
        if self._attachment is not None:
            self._feed(data)
            return
        self._buffer += data
        try:
            parsed = read_secret(bytes(self._buffer))
        except BadHandshake as exc:
            self._refuse(str(exc))
            return
        if parsed is None:
            return
        secret, rest = parsed
        pending = self.rendezvous.claim(secret)
        if pending is None:
            self._refuse("unknown, expired or used secret")
            return
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self._admitted()
        assert self._transport is not None
        transport = self._transport
        self._pending = pending
        self.log = event_log(__name__, app=pending.app, dyno=pending.dyno.name, conn="rendezvous")
        transport.write(GREETING)
        self._attachment = Attachment(
            Client(
                transport.write, transport.write, transport.pause_reading, transport.resume_reading
            ),
            self.rendezvous.idle_timeout,
            self._idle_cutoff,
        )
        if rest:
            self._feed(rest)
        self._task = asyncio.get_running_loop().create_task(self._run(pending))
        self._task.add_done_callback(self._task_done)

    def _feed(self, data: bytes) -> None:
        """Without a terminal the CLI ends its input with 0x04 (it never half-closes):
        a chunk ending in 0x04 is the end of input. With a PTY, 0x04 is the PTY's EOF."""
        assert self._attachment is not None and self._pending is not None
        if self._pending.pty is None and data.endswith(b"\x04"):
            self._attachment.feed(data[:-1])
            self._attachment.feed_eof()
        else:
            self._attachment.feed(data)

    def pause_writing(self) -> None:
        if self._attachment is not None:
            self._attachment.pause_output()

    def resume_writing(self) -> None:
        if self._attachment is not None:
            self._attachment.resume_output()

    def connection_lost(self, exc: Exception | None) -> None:
        self._admitted()
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._close()

    async def _run(self, pending: PendingAttach) -> None:
        attachment, transport = self._attachment, self._transport
        assert attachment is not None and transport is not None
        try:
            streams = await pending.link.attach()
        except ManagerError as exc:
            self.log.warning("attach failed error=%s", exc)
            transport.close()
            return
        self.log.info("rendezvous attached pty=%s", pending.pty is not None)
        attachment.start(streams.fds, pty=pending.pty is not None)
        self.rendezvous.sessions.add(self)
        dyno = pending.dyno
        self._trace = self.rendezvous.observer.session(
            "rendezvous", pending.app, dyno.name, dyno.size, dyno.command,
            pending.pty is not None, "rendezvous",
        )  # fmt: skip
        try:
            exit = await pending.link.exited()
        except ManagerError:
            await attachment.drained()
            transport.close()
            return
        await attachment.drained()
        self._trace.exit_status, self._trace.exit_signal = exit.status, exit.signal
        self.log.info("rendezvous ended status=%s", exit.shell_status)
        transport.write(exit_marker(exit.shell_status))
        transport.close()

    def _idle_cutoff(self) -> None:
        self.log.info("rendezvous idle, closing")
        if self._transport is not None:
            self._transport.close()

    def _refuse(self, reason: str) -> None:
        """Close without a word: a client without a valid secret learns nothing."""
        self.log.info("rendezvous refused reason=%s", reason)
        if self._transport is not None:
            self._transport.abort()

    def notify(self, text: str) -> None:
        if self._transport is not None:
            self._transport.write(f"\r\n{text}\r\n".encode())

    def hang_up(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _close(self) -> None:
        self.rendezvous.sessions.discard(self)
        if self._attachment is not None:
            if self._trace is not None:
                self._trace.ended(self._attachment.bytes_in, self._attachment.bytes_out)
            self._attachment.close()
        if self._pending is not None:
            self._pending.link.close()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.log.error("rendezvous failed", exc_info=task.exception())
            if self._transport is not None:
                self._transport.abort()
