"""Small helpers: statistics and progress lines."""

from __future__ import annotations

import statistics
import sys
import time

MB = 1024 * 1024


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (0-100), nearest rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


class Progress:
    """`label 12/50` on stderr: rewritten in place on a terminal, a line per tenth
    elsewhere (CI logs); then how long it took."""

    def __init__(self, label: str, total: int) -> None:
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()

    def step(self, count: int = 1) -> None:
        before, self.done = self.done, self.done + count
        if self.tty:
            print(f"\r  {self.label} {self.done}/{self.total}", end="", file=sys.stderr)
        elif before * 10 // self.total != self.done * 10 // self.total:
            print(f"  {self.label} {self.done}/{self.total}", file=sys.stderr, flush=True)
        if before < self.total <= self.done:
            elapsed = time.monotonic() - self.started
            end = "\r" if self.tty else ""
            print(f"{end}  {self.label} done in {elapsed:.1f} s", file=sys.stderr, flush=True)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
