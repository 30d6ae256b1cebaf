"""How refused connections are recorded without a flood growing the record without bound.

Pure rules, no I/O: time is passed in. The front's observer (gateway/front/observe.py)
writes what they say to the log and the audit trail.

Within each `interval`, the first refusal of a (listener, source, reason) is written in
full; the rest are only counted, and at the end of the interval each such key with more
than one refusal gets one summary line with its count. At most `capacity` keys are told
apart per interval: refusals from further sources are counted under the source `*`. So
an interval writes at most (capacity + reasons) lines in full and as many summaries,
however many connections are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

OTHER_SOURCES = "*"
INTERVAL = 60.0
CAPACITY = 64


@dataclass(frozen=True)
class Summary:
    """`count` refusals of `reason` on `listener` from `source` in the interval that
    started at `since` (the first of them was written in full)."""

    listener: str
    source: str
    reason: str
    count: int
    since: float


class RefusalDigest:
    def __init__(self, interval: float = INTERVAL, capacity: int = CAPACITY) -> None:
        self.interval = interval
        self.capacity = capacity
        self._since: float | None = None
        self._counts: dict[tuple[str, str, str], int] = {}
        self._sources: set[tuple[str, str]] = set()

    def refused(self, listener: str, source: str, reason: str, now: float) -> bool:
        """Count one refusal; True when it is the first of its kind in this interval and
        is to be written in full. Call `flush(now)` first to close a finished interval."""
        if self._since is None:
            self._since = now
        if (listener, source) not in self._sources:
            if len(self._sources) >= self.capacity:
                source = OTHER_SOURCES
            else:
                self._sources.add((listener, source))
        key = (listener, source, reason)
        count = self._counts.get(key, 0) + 1
        self._counts[key] = count
        return count == 1

    def due(self) -> float | None:
        """When the current interval ends, if it has something to summarize."""
        if self._since is None or all(count == 1 for count in self._counts.values()):
            return None
        return self._since + self.interval

    def flush(self, now: float, force: bool = False) -> list[Summary]:
        """The summaries of the interval if it has ended by `now` (or `force`: at shutdown),
        which then starts afresh; otherwise nothing."""
        if self._since is None or (not force and now < self._since + self.interval):
            return []
        since = self._since
        summaries = [
            Summary(listener, source, reason, count, since)
            for (listener, source, reason), count in self._counts.items()
            if count > 1
        ]
        self._since = None
        self._counts.clear()
        self._sources.clear()
        return summaries
