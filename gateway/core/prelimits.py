"""Limits on what an SSH client may do before and around authentication, as OpenSSH has.

Pure rules, no I/O: randomness and time are passed in, so every decision is tested
without sockets or clocks. The front (gateway/front/ssh.py) applies them.

- MaxStartups random early drop: past START unauthenticated connections, a new one is
  dropped with probability RATE%, rising linearly to 100% at FULL.
- Per-source penalty: after N failed authentications from one address within a window,
  that address is refused for the window's length. The table of addresses is bounded.
- The environment allow-list: which client `env` requests may reach a dyno.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# Enough for every address that failed recently on a busy host; a flood of addresses
# evicts the least recently seen instead of growing memory.
PENALTY_CAPACITY = 4096
# Client env values are for locales and time zones, and the run message to the manager
# is one packet (64 KB): bound what one session may pass.
MAX_ENV_VALUE = 1024
MAX_ENV_VARS = 32
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Startups:
    """OpenSSH's MaxStartups `start:rate:full` (already validated by gateway.config)."""

    start: int
    rate: int
    full: int

    @classmethod
    def parse(cls, text: str) -> Startups:
        start, rate, full = (int(part) for part in text.split(":"))
        if not 0 < start <= full or not 0 <= rate <= 100:
            raise ValueError(f"max_startups must be START:RATE:FULL, got {text!r}")
        return cls(start, rate, full)


def drop_probability(unauthenticated: int, start: int, rate: int, full: int) -> float:
    """The chance (0..1) that a new connection is dropped while `unauthenticated`
    connections are waiting to authenticate (the new one not counted), as sshd computes it."""
    if unauthenticated < start:
        return 0.0
    if unauthenticated >= full:
        return 1.0
    percent = rate + (100 - rate) * (unauthenticated - start) / (full - start)
    return percent / 100


def should_drop(
    unauthenticated: int, start: int, rate: int, full: int, random_value: float
) -> bool:
    """Random early drop: `random_value` is uniform in [0, 1) (random.random())."""
    return random_value < drop_probability(unauthenticated, start, rate, full)


@dataclass
class _Source:
    failures: list[float] = field(default_factory=list)  # times, newest last
    refused_until: float = 0.0


class PenaltyBox:
    """Failed authentications per source address, and the addresses refused for them.

    `failures` within `window` seconds refuse the address for `window` seconds (0 for
    either disables the penalty). At most `capacity` addresses are remembered, the least
    recently seen evicted first, so a flood of addresses costs bounded memory.
    """

    def __init__(self, failures: int, window: float, capacity: int = PENALTY_CAPACITY) -> None:
        self.failures = failures
        self.window = window
        self.capacity = capacity
        self._sources: OrderedDict[str, _Source] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.failures > 0 and self.window > 0

    def __len__(self) -> int:
        return len(self._sources)

    def refused_for(self, source: str, now: float) -> float:
        """Seconds `source` is still refused (0.0: let it in). A refused source counts as
        recently seen, so a flood of other addresses does not evict it first."""
        entry = self._sources.get(source)
        if entry is None or entry.refused_until <= now:
            return 0.0
        self._sources.move_to_end(source)
        return entry.refused_until - now

    def failure(self, source: str, now: float) -> bool:
        """Record a failed authentication; True when it starts a penalty for `source`."""
        if not self.enabled:
            return False
        entry = self._sources.pop(source, None) or _Source()
        self._sources[source] = entry  # most recently seen last
        while len(self._sources) > self.capacity:
            self._sources.popitem(last=False)
        if entry.refused_until > now:
            return False  # already refused (a connection from before the penalty)
        horizon = now - self.window
        entry.failures = [t for t in entry.failures if t > horizon]
        entry.failures.append(now)
        if len(entry.failures) < self.failures:
            return False
        entry.failures.clear()
        entry.refused_until = now + self.window
        return True


def env_allowed(name: str, patterns: Iterable[str]) -> bool:
    """Whether `name` matches one of `patterns`: exact, or a prefix when it ends in `*`."""
    for pattern in patterns:
        if pattern.endswith("*"):
            if name.startswith(pattern[:-1]):
                return True
        elif name == pattern:
            return True
    return False


def filter_env(env: Mapping[str, str], patterns: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """The client variables that may reach a dyno, and the names refused. A name must
    be a valid environment variable name, its value short and free of NUL bytes."""
    patterns = tuple(patterns)
    accepted: dict[str, str] = {}
    refused: list[str] = []
    for name, value in env.items():
        if (
            len(accepted) < MAX_ENV_VARS
            and _ENV_NAME.fullmatch(name)
            and env_allowed(name, patterns)
            and len(value.encode()) <= MAX_ENV_VALUE
            and "\0" not in value
        ):
            accepted[name] = value
        else:
            refused.append(name)
    return accepted, refused
