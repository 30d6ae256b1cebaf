"""The attached sessions of this front (SSH and rendezvous), so that shutdown can tell them
and then end them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

log = logging.getLogger(__name__)


class Attached(Protocol):
    def notify(self, text: str) -> None:
        """One line for the client's stderr (or its stream, on the rendezvous)."""
        ...

    def hang_up(self) -> None:
        """End the session as a disconnect would: the dyno gets SIGHUP."""
        ...


class AttachedSessions:
    def __init__(self) -> None:
        self._sessions: set[Attached] = set()
        self._empty = asyncio.Event()
        self._empty.set()

    def add(self, session: Attached) -> None:
        self._sessions.add(session)
        self._empty.clear()

    def discard(self, session: Attached) -> None:
        self._sessions.discard(session)
        if not self._sessions:
            self._empty.set()

    async def drain(self, timeout: float) -> None:
        """Tell every session the gateway is stopping, give them `timeout` seconds to end
        by themselves, then hang up the rest."""
        if not self._sessions:
            return
        log.info("draining %d attached sessions for up to %d s", len(self._sessions), timeout)
        for session in list(self._sessions):
            session.notify(f"gateway: shutting down; this session will be closed in {timeout:g} s")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._empty.wait()
        for session in list(self._sessions):
            session.hang_up()
