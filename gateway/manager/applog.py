"""Writing the app log, and feeding it live to `run:logs --tail` readers.

A reader never slows a dyno: each has a bounded queue, and lines that do not fit are
counted as dropped, and the reader is told how many.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import trio

from gateway.config import LogSettings
from gateway.core.applog import LogLine
from gateway.core.lograte import LogRate, notice
from gateway.store import Store, StoreUnavailable

log = logging.getLogger("gateway.manager")

FEED_CAPACITY = 1000


class LogFeed:
    """One live reader's queue of new lines for an app (or one of its dynos)."""

    def __init__(self, dyno: str | None) -> None:
        self.dyno = dyno
        self._send, self.receive = trio.open_memory_channel[LogLine](FEED_CAPACITY)
        self.dropped = 0

    def offer(self, line: LogLine) -> None:
        if self.dyno is not None and line.dyno != self.dyno:
            return
        try:
            self._send.send_nowait(line)
        except trio.WouldBlock:
            self.dropped += 1

    def take_dropped(self) -> int:
        dropped, self.dropped = self.dropped, 0
        return dropped


class AppLog:
    def __init__(self, store: Store, settings: LogSettings) -> None:
        self.store = store
        self.keep = settings.lines_per_app
        self.settings = settings
        self._feeds: dict[str, set[LogFeed]] = defaultdict(set)

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
        try:
            self.store.append_log(app, lines, self.keep)
        except StoreUnavailable as exc:
            # A dyno never stops for its log: the lines still reach live readers.
            log.warning(
                "app log lines lost app=%s dyno=%s lines=%d error=%s",
                app, lines[0].dyno, len(lines), exc,
            )  # fmt: skip
        for feed in self._feeds.get(app, ()):
            for line in lines:
                feed.offer(line)

    @contextmanager
    def follow(self, app: str, dyno: str | None) -> Iterator[LogFeed]:
        """A live feed of the app's new lines while the block runs."""
        feed = LogFeed(dyno)
        self._feeds[app].add(feed)
        try:
            yield feed
        finally:
            self._feeds[app].discard(feed)
            if not self._feeds[app]:
                del self._feeds[app]
