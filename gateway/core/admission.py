"""Admission of unauthenticated connections: who may start a handshake now, who waits,
who is refused. Pure rules, no I/O: time is passed in. The front (gateway/front/gate.py)
applies them to the SSH, rendezvous and API listeners, one `Admission` each.

A connection is *pending* from accept until it authenticates or goes away. A pending
connection is either in the handshake (holding one of the `slots`: SSH key exchange and
authentication, a TLS handshake, a first HTTP request) or *waiting* for a slot, accepted
by the kernel but with nothing read from it or sent to it.

- At most `slots` connections are in the handshake, at most `per_source` of them from one
  address and `per_netblock` from one netblock (a /24 or /64 by default). A connection
  over these shares waits; it is never dropped at random.
- A slot that frees goes to the waiting connection whose netblock, then address, holds
  the fewest slots, the longest-waiting first: a burst from one source is served in
  order (first in, first out), and a newcomer from elsewhere is not stuck behind it.
- At most `waiting` connections wait, and a connection waits at most `wait_time`
  seconds. One netblock holds at most `per_netblock_pending` connections, waiting or
  in the handshake.
- When the waiting room (or a netblock's allowance) is full, the newcomer takes the place
  of the newest waiting connection of the source that holds the most waiting places, if
  that source holds at least two more than the newcomer's; otherwise the newcomer is
  refused. So a flood fills the room only until someone else arrives.
"""

from __future__ import annotations

import ipaddress
from collections import Counter, OrderedDict, deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

# Refusal reasons (log lines and audit events carry them as `reason=`).
PER_NETBLOCK_PENDING = "per_netblock_max_pending"
WAITING_ROOM_FULL = "max_waiting"
NO_WAITING = "max_startups"
DISPLACED = "displaced"
WAIT_TIMEOUT = "wait_timeout"


@dataclass(frozen=True)
class NetblockSize:
    """OpenSSH's PerSourceNetBlockSize: the prefix lengths that group addresses."""

    v4: int = 24
    v6: int = 64

    @classmethod
    def parse(cls, text: str) -> NetblockSize:
        """`V4` or `V4:V6`, as OpenSSH writes it (`24:64`); V6 defaults to 128."""
        parts = text.split(":")
        try:
            if len(parts) > 2:
                raise ValueError
            v4 = int(parts[0])
            v6 = int(parts[1]) if len(parts) == 2 else 128
        except ValueError:
            raise ValueError(f"expected V4 or V4:V6 prefix lengths, got {text!r}") from None
        if not 0 <= v4 <= 32 or not 0 <= v6 <= 128:
            raise ValueError(f"prefix lengths must be 0-32 and 0-128, got {text!r}")
        return cls(v4, v6)


def startup_slots(text: str) -> int:
    """The handshake slots `max_startups` gives: `N`, or OpenSSH's `START:RATE:FULL`, of
    which FULL (sshd's most unauthenticated connections) is the count. START and RATE set
    sshd's random early drop; here a connection over the limit waits instead."""
    parts = text.split(":")
    try:
        if len(parts) not in (1, 3):
            raise ValueError
        numbers = [int(part) for part in parts]
    except ValueError:
        raise ValueError(f"expected N or START:RATE:FULL, got {text!r}") from None
    if len(numbers) == 3:
        start, rate, full = numbers
        if not 0 < start <= full or not 0 <= rate <= 100:
            raise ValueError(f"START:RATE:FULL needs 0 < START <= FULL and RATE 0-100: {text!r}")
    if numbers[-1] <= 0:
        raise ValueError(f"max_startups must be positive, got {text!r}")
    return numbers[-1]


def canonical_address(address: str) -> str:
    """The address as one spelling: IPv4-mapped IPv6 (a dual-stack listener's view of an
    IPv4 client) as plain IPv4; anything not an IP address unchanged."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def netblock(address: str, size: NetblockSize) -> str:
    """The network `address` belongs to (`192.0.2.0/24`); a non-IP address is its own."""
    try:
        ip = ipaddress.ip_address(canonical_address(address))
    except ValueError:
        return address
    prefix = size.v4 if ip.version == 4 else size.v6
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


@dataclass(frozen=True)
class AdmissionLimits:
    """The admission settings of one listener. 0 for `per_source`, `per_netblock` or
    `per_netblock_pending` means no limit of its own; `waiting` 0 means nobody waits
    (a connection with no slot is refused); `wait_time` 0 means no deadline."""

    slots: int = 100
    per_source: int = 10
    per_netblock: int = 30
    waiting: int = 1000
    per_netblock_pending: int = 500
    wait_time: float = 30.0
    netblock: NetblockSize = field(default_factory=NetblockSize)


@dataclass(frozen=True)
class Arrival:
    """What happens to a new connection: `admitted` (start its handshake now), `waiting`
    or `refused` (with `reason`). `displaced` is a waiting connection that lost its
    place to this one: close it (reason DISPLACED)."""

    outcome: str
    reason: str = ""
    displaced: Hashable | None = None


@dataclass
class _Entry:
    address: str
    net: str
    seq: int
    deadline: float | None
    active: bool = False


class Admission:
    """Pending connections of one listener, by the rules in this module's docstring.
    Connections are named by any hashable the caller chooses."""

    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self._entries: dict[Hashable, _Entry] = {}
        self._seq = 0
        self._active_total = 0
        self._active_by_addr: Counter[str] = Counter()
        self._active_by_net: Counter[str] = Counter()
        self._pending_by_net: Counter[str] = Counter()
        # Waiting connections: by netblock, then address, each FIFO; and all of them in
        # arrival order (which is deadline order: every one waits the same wait_time).
        self._queues: dict[str, dict[str, deque[Hashable]]] = {}
        self._waiting_by_net: Counter[str] = Counter()
        self._arrivals: OrderedDict[Hashable, None] = OrderedDict()

    # -- what the front asks ---------------------------------------------------------

    @property
    def active(self) -> int:
        """Connections in the handshake now."""
        return self._active_total

    @property
    def waiting(self) -> int:
        """Connections waiting for a slot now."""
        return len(self._arrivals)

    def active_from(self, address: str) -> int:
        return self._active_by_addr[canonical_address(address)]

    def waiting_from(self, address: str) -> int:
        address = canonical_address(address)
        net = netblock(address, self.limits.netblock)
        return len(self._queues.get(net, {}).get(address, ()))

    def is_waiting(self, conn: Hashable) -> bool:
        entry = self._entries.get(conn)
        return entry is not None and not entry.active

    def arrive(self, conn: Hashable, address: str, now: float) -> Arrival:
        """A new connection from `address`: admit it, make it wait, or refuse it."""
        if conn in self._entries:
            raise ValueError(f"connection {conn!r} arrived twice")
        address = canonical_address(address)
        net = netblock(address, self.limits.netblock)
        displaced = None
        cap = self.limits.per_netblock_pending
        if cap and self._pending_by_net[net] >= cap:
            displaced = self._displace_within(net, address)
            if displaced is None:
                return Arrival("refused", PER_NETBLOCK_PENDING)
        if self._has_slot(address, net):
            self._add(conn, address, net, now, active=True)
            return Arrival("admitted", displaced=displaced)
        if not self.limits.waiting:
            return Arrival("refused", NO_WAITING, displaced)
        if displaced is None and self.waiting >= self.limits.waiting:
            displaced = self._displace_across(net)
            if displaced is None:
                return Arrival("refused", WAITING_ROOM_FULL)
        self._add(conn, address, net, now, active=False)
        return Arrival("waiting", displaced=displaced)

    def settle(self, conn: Hashable) -> list[Hashable]:
        """`conn` authenticated or went away (unknown or already settled: nothing). The
        waiting connections that get the slots this frees, to be started now."""
        entry = self._entries.pop(conn, None)
        if entry is None:
            return []
        self._pending_by_net[entry.net] -= 1
        if not self._pending_by_net[entry.net]:
            del self._pending_by_net[entry.net]
        if not entry.active:
            self._unqueue(conn, entry)
            return []
        self._active_total -= 1
        for counter, key in (
            (self._active_by_addr, entry.address),
            (self._active_by_net, entry.net),
        ):
            counter[key] -= 1
            if not counter[key]:
                del counter[key]
        return self._fill()

    def next_deadline(self) -> float | None:
        """When the longest-waiting connection runs out of time (None: nobody waits, or
        waiting has no deadline)."""
        for conn in self._arrivals:
            return self._entries[conn].deadline
        return None

    def expire(self, now: float) -> list[Hashable]:
        """Waiting connections whose time ran out, oldest first; they are forgotten here
        and are to be closed (reason WAIT_TIMEOUT)."""
        expired = []
        while self._arrivals:
            conn = next(iter(self._arrivals))
            deadline = self._entries[conn].deadline
            if deadline is None or deadline > now:
                break
            self.settle(conn)
            expired.append(conn)
        return expired

    # -- the rules -------------------------------------------------------------------

    def _has_slot(self, address: str, net: str) -> bool:
        limits = self.limits
        return (
            self._active_total < limits.slots
            and not (limits.per_source and self._active_by_addr[address] >= limits.per_source)
            and not (limits.per_netblock and self._active_by_net[net] >= limits.per_netblock)
        )

    def _add(self, conn: Hashable, address: str, net: str, now: float, active: bool) -> None:
        wait_time = self.limits.wait_time
        deadline = None if active or not wait_time else now + wait_time
        self._seq += 1
        self._entries[conn] = _Entry(address, net, self._seq, deadline)
        self._pending_by_net[net] += 1
        if active:
            self._activate(conn)
        else:
            self._queues.setdefault(net, {}).setdefault(address, deque()).append(conn)
            self._waiting_by_net[net] += 1
            self._arrivals[conn] = None

    def _activate(self, conn: Hashable) -> None:
        entry = self._entries[conn]
        entry.active = True
        entry.deadline = None
        self._active_total += 1
        self._active_by_addr[entry.address] += 1
        self._active_by_net[entry.net] += 1

    def _unqueue(self, conn: Hashable, entry: _Entry) -> None:
        by_addr = self._queues[entry.net]
        queue = by_addr[entry.address]
        queue.remove(conn)
        if not queue:
            del by_addr[entry.address]
            if not by_addr:
                del self._queues[entry.net]
        self._waiting_by_net[entry.net] -= 1
        if not self._waiting_by_net[entry.net]:
            del self._waiting_by_net[entry.net]
        del self._arrivals[conn]

    def _fill(self) -> list[Hashable]:
        """Give free slots to waiting connections, fairest first."""
        started: list[Hashable] = []
        while self._active_total < self.limits.slots:
            best: tuple[int, int, int] | None = None
            chosen = None
            for net, by_addr in self._queues.items():
                if (
                    self.limits.per_netblock
                    and self._active_by_net[net] >= self.limits.per_netblock
                ):
                    continue
                for address, queue in by_addr.items():
                    if (
                        self.limits.per_source
                        and self._active_by_addr[address] >= self.limits.per_source
                    ):
                        continue
                    head = queue[0]
                    rank = (
                        self._active_by_net[net],
                        self._active_by_addr[address],
                        self._entries[head].seq,
                    )
                    if best is None or rank < best:
                        best, chosen = rank, head
            if chosen is None:
                break
            entry = self._entries[chosen]
            self._unqueue(chosen, entry)
            self._activate(chosen)
            started.append(chosen)
        return started

    def _displace_within(self, net: str, address: str) -> Hashable | None:
        """Room in a full netblock: the newest waiting connection of its address with the
        most waiting, if that holds at least two more than `address` does."""
        by_addr = self._queues.get(net, {})
        mine = len(by_addr.get(address, ()))
        fattest = max(by_addr, key=lambda a: len(by_addr[a]), default=None)
        if fattest is None or len(by_addr[fattest]) < mine + 2:
            return None
        return self._evict(by_addr[fattest][-1])

    def _displace_across(self, net: str) -> Hashable | None:
        """Room in a full waiting room: as `_displace_within`, between netblocks."""
        mine = self._waiting_by_net[net]
        fattest = max(self._waiting_by_net, key=self._waiting_by_net.__getitem__, default=None)
        if fattest is None or self._waiting_by_net[fattest] < mine + 2:
            return None
        by_addr = self._queues[fattest]
        address = max(by_addr, key=lambda a: len(by_addr[a]))
        return self._evict(by_addr[address][-1])

    def _evict(self, conn: Hashable) -> Hashable:
        self.settle(conn)
        return conn


def parse_networks(
    texts: Iterable[str],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """CIDR blocks (`10.0.0.0/8`, `2001:db8::/32`, or a plain address); ValueError names
    the first bad one."""
    networks = []
    for text in texts:
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ValueError(f"not an address or CIDR block: {text!r}") from None
    return tuple(networks)


def in_networks(
    address: str, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    """Whether `address` falls in one of `networks` (a non-IP address never does)."""
    try:
        ip = ipaddress.ip_address(canonical_address(address))
    except ValueError:
        return False
    return any(ip in network for network in networks)
