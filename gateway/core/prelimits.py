"""Limits on what an SSH client may do before and around authentication, as OpenSSH has.

Pure rules, no I/O: time is passed in, so every decision is tested without sockets or
clocks. The front (gateway/front/ssh.py) applies them. Who may start a handshake at all
is gateway/core/admission.py.

- Per-source penalty: failed authentications from one address within a window refuse
  that address for the window's length. A failure with keys counts per key: the first
  failure of a key (for an app) from an address counts fully against the address, each
  repeat of it a tenth, and a key that keeps failing is refused from that address on its
  own. So one misconfigured client behind a shared address (NAT, a load balancer) does
  not lock out the others, while many keys (a probe) or connections that never try a
  key (a flood) still do. Addresses on an exemption list are never penalized. The table
  of addresses is bounded.
- The environment allow-list: which client `env` requests may reach a dyno.
"""

from __future__ import annotations

import ipaddress
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from gateway.core.admission import in_networks

# Enough for every address that failed recently on a busy host; a flood of addresses
# evicts the least recently seen instead of growing memory.
PENALTY_CAPACITY = 4096
# A repeated failure of the same key from the same address weighs this share of a
# first failure (a client retrying one wrong key is one mistake, not a probe).
REPEAT_SHARE = 10
# Client env values are for locales and time zones, and the run message to the manager
# is one packet (64 KB): bound what one session may pass.
MAX_ENV_VALUE = 1024
MAX_ENV_VARS = 32
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Penalized:
    """What one failure started: a penalty for the whole address, and for which keys."""

    source: bool = False
    keys: tuple[str, ...] = ()


@dataclass
class _Source:
    keyless: list[float] = field(default_factory=list)  # failure times, newest last
    keys: dict[str, list[float]] = field(default_factory=dict)  # key -> failure times
    refused_until: float = 0.0
    keys_refused_until: dict[str, float] = field(default_factory=dict)


class PenaltyBox:
    """Failed authentications per source address, and the addresses (and keys from an
    address) refused for them.

    Within `window` seconds, an address is refused for `window` seconds once its failures
    weigh `failures`: a failure without keys weighs 1, the first failure of a key 1, a
    repeat of that key 1/REPEAT_SHARE. A key failing `failures` times from one address is
    refused from it for `window` seconds. 0 for `failures` or `window` disables both.
    Addresses in `exempt` are never penalized. At most `capacity` addresses are
    remembered, the least recently seen evicted first, so a flood of addresses costs
    bounded memory.
    """

    def __init__(
        self,
        failures: int,
        window: float,
        capacity: int = PENALTY_CAPACITY,
        exempt: Iterable[Network] = (),
    ) -> None:
        self.failures = failures
        self.window = window
        self.capacity = capacity
        self.exempt = tuple(exempt)
        self._sources: OrderedDict[str, _Source] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.failures > 0 and self.window > 0

    def __len__(self) -> int:
        return len(self._sources)

    def is_exempt(self, source: str) -> bool:
        return in_networks(source, self.exempt)

    def refused_for(self, source: str, now: float) -> float:
        """Seconds `source` is still refused (0.0: let it in). A refused source counts as
        recently seen, so a flood of other addresses does not evict it first."""
        entry = self._sources.get(source)
        if entry is None or entry.refused_until <= now:
            return 0.0
        self._sources.move_to_end(source)
        return entry.refused_until - now

    def key_refused_for(self, source: str, key: str, now: float) -> float:
        """Seconds `key` is still refused from `source` (0.0: look at it)."""
        entry = self._sources.get(source)
        until = entry.keys_refused_until.get(key, 0.0) if entry else 0.0
        return max(0.0, until - now)

    def failure(self, source: str, now: float, keys: Iterable[str] = ()) -> Penalized:
        """Record a connection from `source` that ended without authenticating, after
        trying `keys` (none: it never tried one); what penalties that starts."""
        if not self.enabled or self.is_exempt(source):
            return Penalized()
        entry = self._sources.pop(source, None) or _Source()
        self._sources[source] = entry  # most recently seen last
        while len(self._sources) > self.capacity:
            self._sources.popitem(last=False)
        if entry.refused_until > now:
            return Penalized()  # already refused (a connection from before the penalty)
        horizon = now - self.window
        entry.keyless = [t for t in entry.keyless if t > horizon]
        recent = {k: [t for t in ts if t > horizon] for k, ts in entry.keys.items()}
        entry.keys = {k: ts for k, ts in recent.items() if ts}
        entry.keys_refused_until = {
            k: until for k, until in entry.keys_refused_until.items() if until > now
        }
        keys = set(keys)
        if not keys:
            entry.keyless.append(now)
        penalized_keys = []
        for key in sorted(keys):
            times = entry.keys.setdefault(key, [])
            times.append(now)
            if len(times) >= self.failures and key not in entry.keys_refused_until:
                entry.keys_refused_until[key] = now + self.window
                penalized_keys.append(key)
        weight = len(entry.keyless) * REPEAT_SHARE + sum(
            REPEAT_SHARE + len(times) - 1 for times in entry.keys.values()
        )
        if weight < self.failures * REPEAT_SHARE:
            return Penalized(keys=tuple(penalized_keys))
        entry.keyless.clear()
        entry.keys.clear()
        entry.refused_until = now + self.window
        return Penalized(source=True, keys=tuple(penalized_keys))


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
