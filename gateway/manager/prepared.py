"""Sandboxes made ahead of their sessions, so that starting a dyno is one message.

A pool keyed by what a sandbox is made for (app, release, size...). `take` hands an
entry out once: it leaves the pool, and nothing of it is ever handed to anyone else.
`want` asks for the key to be topped up, in the background, to `per_key` entries, never
more than `max_total` in all; wanting a key drops the entries of the same app made for
other releases, and those still being made for them are discarded when done (a replaced
release is never run again). An entry unused for `idle` seconds is discarded, so an idle
host holds none. All background work runs in the
pool's own nursery (`run`), which the sandbox's `run` owns.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

import trio

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Key = TypeVar("Key", bound=Hashable)


@dataclass
class _Entry(Generic[Item]):
    item: Item
    deadline: float


class PreparedPool(Generic[Key, Item]):
    def __init__(
        self,
        make: Callable[[Key], Awaitable[Item]],
        discard: Callable[[Item], Awaitable[None]],
        group: Callable[[Key], Hashable],
        per_key: int,
        max_total: int,
        idle: float,
        concurrency: int = 2,
    ) -> None:
        """`group(key)` is what replaces what: keys of one group for other releases are
        dropped when one is wanted (the app)."""
        self._make = make
        self._discard = discard
        self._group = group
        self.per_key = per_key
        self.max_total = max_total
        self.idle = idle
        self._ready: dict[Key, list[_Entry[Item]]] = {}
        self._making: dict[Key, int] = {}
        self._wanted: dict[Hashable, Key] = {}  # per group, the key last wanted
        self._limiter = trio.CapacityLimiter(concurrency)
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None

    @property
    def total(self) -> int:
        return sum(len(entries) for entries in self._ready.values()) + sum(self._making.values())

    def count(self, key: Key) -> int:
        return len(self._ready.get(key, ()))

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Top up and expire until cancelled; then discard what is left."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._expire)
                task_status.started()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                for key in list(self._ready):
                    for entry in self._ready.pop(key):
                        await self._discard(entry.item)

    def take(self, key: Key) -> Item | None:
        """A prepared entry for `key`, now removed from the pool; None if there is none."""
        entries = self._ready.get(key)
        if not entries:
            return None
        entry = entries.pop()
        if not entries:
            del self._ready[key]
        self._changed.set()
        return entry.item

    def want(self, key: Key) -> None:
        """Top `key` up in the background; drop its group's entries for other keys."""
        if self._nursery is None:
            return
        group = self._group(key)
        self._wanted[group] = key
        for other in [k for k in self._ready if k != key and self._group(k) == group]:
            for entry in self._ready.pop(other):
                self._nursery.start_soon(self._discard, entry.item)
        missing = self.per_key - self.count(key) - self._making.get(key, 0)
        room = self.max_total - self.total
        for _ in range(max(0, min(missing, room))):
            self._making[key] = self._making.get(key, 0) + 1
            self._nursery.start_soon(self._top_up, key)

    async def _top_up(self, key: Key) -> None:
        try:
            async with self._limiter:
                item = await self._make(key)
        except Exception as exc:
            log.warning("preparing a sandbox failed key=%s error=%s", key, exc)
            return
        finally:
            self._making[key] -= 1
            if not self._making[key]:
                del self._making[key]
        if self._wanted.get(self._group(key)) != key:  # replaced while it was being made
            await self._discard(item)
            return
        self._ready.setdefault(key, []).append(_Entry(item, trio.current_time() + self.idle))
        self._changed.set()

    async def _expire(self) -> None:
        """Sleep until the earliest entry's deadline (or a change), discard what is due."""
        assert self._nursery is not None
        while True:
            deadlines = [e.deadline for entries in self._ready.values() for e in entries]
            with trio.move_on_at(min(deadlines, default=math.inf)):
                await self._changed.wait()
            self._changed = trio.Event()
            now = trio.current_time()
            for key in list(self._ready):
                due = [e for e in self._ready[key] if e.deadline <= now]
                if not due:
                    continue
                self._ready[key] = [e for e in self._ready[key] if e.deadline > now]
                if not self._ready[key]:
                    del self._ready[key]
                for entry in due:
                    log.info("prepared sandbox unused for %ds, discarded key=%s", self.idle, key)
                    self._nursery.start_soon(self._discard, entry.item)
