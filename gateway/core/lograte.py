"""The app log's rate limit per dyno: a token bucket for lines and one for bytes.

Eight detached dynos printing as fast as they can once took the manager to 100% CPU and
made every login 15x slower. As Heroku's log-shuttle does when a dyno logs faster than
it can ship (error L12, "Local buffer overflow"), lines past the rate are dropped, and
counted: the count goes to the app log as one error line per `notice_interval` seconds.
Each bucket holds one second's worth, so a burst of that size passes whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    """`rate` tokens a second, at most `rate` held."""

    rate: float
    tokens: float = field(init=False)
    stamp: float = 0.0

    def __post_init__(self) -> None:
        self.tokens = self.rate

    def refill(self, now: float) -> None:
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now


def notice(dropped: int, lines_per_second: int, bytes_per_second: int) -> str:
    """The app log's line for `dropped` lines (Heroku's error code and words)."""
    return (
        f"Error L12 (Local buffer overflow) -> {dropped} log lines dropped: the dyno "
        f"logged more than {lines_per_second} lines or {bytes_per_second} bytes a second"
    )


@dataclass
class LogRate:
    """One dyno's budget. `admit` keeps what fits; `over` says the budget is spent (the
    reader may then count lines without splitting them, and wait); `due` gives the
    count to report once per interval."""

    lines_per_second: int
    bytes_per_second: int
    notice_interval: float = 1.0
    now: float = 0.0
    dropped: int = 0
    _lines: TokenBucket = field(init=False)
    _bytes: TokenBucket = field(init=False)
    _noticed: float = field(init=False)

    def __post_init__(self) -> None:
        self._lines = TokenBucket(self.lines_per_second, stamp=self.now)
        self._bytes = TokenBucket(self.bytes_per_second, stamp=self.now)
        self._noticed = self.now

    def admit(self, lines: list[str], now: float) -> list[str]:
        """The first of `lines` the budget allows; the rest count as dropped."""
        self._refill(now)
        kept = 0
        for line in lines:
            cost = len(line) + 1
            if self._lines.tokens < 1 or self._bytes.tokens < cost:
                break
            self._lines.tokens -= 1
            self._bytes.tokens -= cost
            kept += 1
        self.dropped += len(lines) - kept
        return lines[:kept] if kept < len(lines) else lines

    def drop(self, count: int) -> None:
        """Lines dropped unread (the budget was spent)."""
        self.dropped += count

    def over(self, now: float) -> bool:
        """Whether not even one more line would be admitted now."""
        self._refill(now)
        return self._lines.tokens < 1 or self._bytes.tokens < 1

    def due(self, now: float, final: bool = False) -> int:
        """Lines dropped since the last report, if one is due now (or `final`: the
        dyno's output ended), else 0."""
        if not self.dropped or (not final and now - self._noticed < self.notice_interval):
            return 0
        dropped, self.dropped, self._noticed = self.dropped, 0, now
        return dropped

    def _refill(self, now: float) -> None:
        self._lines.refill(now)
        self._bytes.refill(now)
