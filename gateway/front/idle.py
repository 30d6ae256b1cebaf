"""The idle cutoff of an attached session."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class IdleDeadline:
    """Calls `on_idle` once nothing has been `touch`ed for `timeout` seconds.

    One timer: when it fires early (there was activity since it was set), it re-arms at
    last activity + timeout. So a byte costs one clock read, and nothing polls."""

    def __init__(self, timeout: float, on_idle: Callable[[], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self.timeout = timeout
        self._on_idle = on_idle
        self._last = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None
        if timeout > 0:
            self._timer = self._loop.call_at(self._last + timeout, self._fire)

    def touch(self) -> None:
        self._last = self._loop.time()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        due = self._last + self.timeout
        if self._loop.time() >= due:
            self._timer = None
            self._on_idle()
        else:
            self._timer = self._loop.call_at(due, self._fire)
