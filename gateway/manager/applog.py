"""Writing the app log, and feeding it live to `run:logs --tail` readers.

A reader never slows a dyno: each has a bounded queue, and lines that do not fit are
counted as dropped, and the reader is told how many. Lines from other nodes (a shared
database) reach this node's readers through `relay`, told apart from what a reader's
history already held by their row ids.

While the database cannot be reached, what the app log (and a dyno's closing record)
would write waits here, in order, and is written when it is back (`flush`, at the next
write or heartbeat): at most BACKLOG_BYTES of log lines; past that the oldest are
dropped and counted in the gateway's log. Live readers get every line at once either way.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import trio

from gateway.config import LogSettings
from gateway.core.applog import LogLine
from gateway.core.lograte import LogRate, notice
from gateway.store import Store, StoreError, StoreUnavailable

log = logging.getLogger("gateway.manager")

FEED_CAPACITY = 1000
# Log line bytes kept while the database is away (documented in docs/scale-out.md).
BACKLOG_BYTES = 16 * 1024**2


class LogFeed:
    """One live reader's queue of new lines for an app (or one of its dynos). `seen`:
    the ids of the lines its history held, which another node's notice may name again."""

    def __init__(self, dyno: str | None, seen: frozenset[int] = frozenset()) -> None:
        self.dyno = dyno
        self.seen = seen
        self._send, self.receive = trio.open_memory_channel[LogLine](FEED_CAPACITY)
        self.dropped = 0

    def offer(self, line: LogLine) -> None:
        if self.dyno is not None and line.dyno != self.dyno:
            return
        if line.id is not None and line.id in self.seen:
            return
        try:
            self._send.send_nowait(line)
        except trio.WouldBlock:
            self.dropped += 1

    def take_dropped(self) -> int:
        dropped, self.dropped = self.dropped, 0
        return dropped


@dataclass
class _Write:
    """A write waiting for the database: `size` log bytes (0 for a record)."""

    what: str
    size: int
    write: Callable[[], None]


class AppLog:
    def __init__(self, store: Store, settings: LogSettings) -> None:
        self.store = store
        self.keep = settings.lines_per_app
        self.settings = settings
        self._feeds: dict[str, set[LogFeed]] = defaultdict(set)
        self._backlog: deque[_Write] = deque()
        self._backlog_bytes = 0
        self._dropped = 0

    def rate(self) -> LogRate:
        """A new budget for one dyno's output (gateway/core/lograte.py)."""
        return LogRate(self.settings.rate_lines, self.settings.rate_bytes, now=trio.current_time())

    def dropped(self, app: str, dyno: str, count: int) -> None:
        """Say that `count` of the dyno's lines were dropped, as Heroku says it (L12)."""
        settings = self.settings
        self.heroku(app, dyno, notice(count, settings.rate_lines, settings.rate_bytes))
        log.info("app log lines dropped app=%s dyno=%s lines=%d", app, dyno, count)

    def heroku(self, app: str, dyno: str, *messages: str) -> None:
        """Lines from the platform about a dyno (`heroku[run.N]: ...`)."""
        self._append(app, [LogLine(time.time(), "heroku", dyno, m) for m in messages])

    def output(self, app: str, dyno: str, lines: list[str]) -> None:
        """Lines a dyno printed (`app[run.N]: ...`)."""
        self._append(app, [LogLine(time.time(), "app", dyno, m) for m in lines])

    def _append(self, app: str, lines: list[LogLine]) -> None:
        if not lines:
            return
        # A dyno never waits for its log: the lines reach live readers now.
        self.relay(app, lines)
        size = sum(len(line.message) for line in lines)
        what = f"app={app} dyno={lines[0].dyno} lines={len(lines)}"
        self.in_order(what, lambda: self.store.append_log(app, lines, self.keep), size)

    def in_order(self, what: str, write: Callable[[], None], size: int = 0) -> None:
        """Run `write` (a store write) now, or after the writes already waiting for the
        database, once it is back."""
        self._backlog.append(_Write(what, size, write))
        self._backlog_bytes += size
        while self._backlog_bytes > BACKLOG_BYTES:
            self._drop_oldest()
        if len(self._backlog) == 1:
            self.flush()

    def _drop_oldest(self) -> None:
        for i, waiting in enumerate(self._backlog):
            if waiting.size:
                del self._backlog[i]
                self._backlog_bytes -= waiting.size
                self._dropped += 1
                log.warning("app log lines lost (backlog full) %s", waiting.what)
                return
        self._backlog_bytes = 0

    def flush(self) -> bool:
        """Write what waits, in order; False while the database is still away."""
        while self._backlog:
            waiting = self._backlog[0]
            try:
                waiting.write()
            except StoreUnavailable as exc:
                log.warning("app log waiting for the database %s error=%s", waiting.what, exc)
                return False
            except StoreError as exc:  # the app was deleted meanwhile
                log.warning("app log write dropped %s error=%s", waiting.what, exc)
            self._backlog.popleft()
            self._backlog_bytes -= waiting.size
        return True

    @property
    def waiting(self) -> int:
        """Writes waiting for the database."""
        return len(self._backlog)

    def following(self, app: str) -> bool:
        """Whether a live reader follows the app's log here."""
        return app in self._feeds

    def relay(self, app: str, lines: list[LogLine]) -> None:
        """Give new lines to the app's live readers (no store write: lines this node
        wrote, or another node's, read back from the store)."""
        for feed in self._feeds.get(app, ()):
            for line in lines:
                feed.offer(line)

    @contextmanager
    def follow(
        self, app: str, dyno: str | None, seen: frozenset[int] = frozenset()
    ) -> Iterator[LogFeed]:
        """A live feed of the app's new lines while the block runs."""
        feed = LogFeed(dyno, seen)
        self._feeds[app].add(feed)
        try:
            yield feed
        finally:
            self._feeds[app].discard(feed)
            if not self._feeds[app]:
                del self._feeds[app]
