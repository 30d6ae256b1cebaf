"""Outbound networking for dynos in the kernel: a veth pair per dyno into its network
namespace, and one nftables table that masquerades what leaves, as container engines do.
No process per dyno and no user-space copy of its traffic (slirp4netns stays for the
sandbox without root).

What it allows, in the table's own words (`ruleset`):
- a dyno opens connections out to anything but the host and other dynos, NATed to the
  host's address (a console reaches the app's database);
- nothing new reaches a dyno: not from outside, not from another dyno, not from the
  host itself (only replies to what the dyno opened);
- a dyno reaches no address of the host (its loopback and the gateway's ports
  included): the host's own input from dyno interfaces is dropped.

Each dyno gets a /30 of `subnet`: the host side .1, the dyno .2 (eth0, default route).
The dyno's init makes the pair and addresses both ends itself, over rtnetlink, as it
builds the namespace (dyno_init.c, `build_network`): no `ip` process per dyno. The pair
goes with the dyno's network namespace; its slot is taken again only once the kernel
has removed it. Interface names carry a short digest of the state dir, so two gateways
on one host keep out of each other's way, and a restarted manager finds what a dead one
left.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FORWARDING = Path("/proc/sys/net/ipv4/ip_forward")


class NetworkError(Exception):
    """Kernel networking for dynos could not be set up; the message says why."""


@dataclass(frozen=True)
class Link:
    """One dyno's veth pair: the host side's name, and the /30 addresses."""

    slot: int
    host_name: str
    host_address: str
    dyno_address: str


def name_prefix(state_dir: Path) -> str:
    """`gw` and four hex digits of the state dir: short, for IFNAMSIZ (15 characters)."""
    return "gw" + hashlib.sha256(os.fsencode(state_dir.resolve())).hexdigest()[:4]


def link_for(subnet: ipaddress.IPv4Network, prefix: str, slot: int) -> Link:
    base = subnet.network_address + 4 * slot
    if base + 3 > subnet.broadcast_address:
        raise NetworkError(f"dynos.subnet {subnet} has no room for dyno {slot + 1}")
    return Link(slot, f"{prefix}-{slot}", str(base + 1), str(base + 2))


def ruleset(table: str, prefix: str, subnet: ipaddress.IPv4Network) -> str:
    """The nftables table (`nft -f` input) for the dynos of one gateway."""
    dynos = f'"{prefix}-*"'
    return f"""table ip {table} {{
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname {dynos} ip daddr {subnet} drop
        oifname {dynos} ct state established,related accept
        oifname {dynos} drop
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname {dynos} ct state established,related accept
        iifname {dynos} drop
    }}
    chain output {{
        type filter hook output priority filter; policy accept;
        oifname {dynos} ct state established,related accept
        oifname {dynos} drop
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {subnet} oifname != {dynos} masquerade
    }}
}}
"""


def upstream_resolv_conf(texts: list[str]) -> str | None:
    """A resolv.conf for dynos from the host's (first the one given first): its name
    servers that a dyno can reach (not on the host's loopback, which dynos cannot reach),
    with its search domains. None when the host has none."""
    for text in texts:
        servers, search = [], []
        for line in text.splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    if not ipaddress.ip_address(words[1].split("%")[0]).is_loopback:
                        servers.append(words[1])
            elif words and words[0] in ("search", "domain"):
                search = words[1:]
        if servers:
            lines = [f"nameserver {server}" for server in servers]
            if search:
                lines.append("search " + " ".join(search))
            return "\n".join(lines) + "\n"
    return None


class VethNetwork:
    """The dynos' network on this host: the table, the slots in use, and the pairs."""

    def __init__(self, tools: dict[str, str], state_dir: Path, subnet: str) -> None:
        self.tools = tools
        self.subnet = ipaddress.IPv4Network(subnet)
        self.prefix = name_prefix(state_dir)
        self.table = f"gateway_{self.prefix}"
        self._free: list[int] = []
        self._next = 0

    def install(self) -> None:
        """At start: forwarding on (the host routes what dynos send), the table afresh,
        and any pair a dead manager left removed."""
        self.remove_leftovers()
        try:
            FORWARDING.write_text("1\n")
        except OSError as exc:
            raise NetworkError(f"cannot enable IPv4 forwarding: {exc.strerror}") from None
        nft = self.tools["nft"]
        subprocess.run([nft, "delete", "table", "ip", self.table], capture_output=True)
        result = subprocess.run(
            [nft, "-f", "-"], input=ruleset(self.table, self.prefix, self.subnet),
            capture_output=True, text=True,
        )  # fmt: skip
        if result.returncode != 0:
            raise NetworkError(f"nft refused the dynos' table: {result.stderr.strip()}")

    def uninstall(self) -> None:
        """At shutdown: the table goes (the pairs went with their namespaces)."""
        subprocess.run([self.tools["nft"], "delete", "table", "ip", self.table],
                       capture_output=True)  # fmt: skip

    def remove_leftovers(self) -> None:
        out = subprocess.run(
            [self.tools["ip"], "-o", "link", "show"], capture_output=True, text=True
        ).stdout
        for line in out.splitlines():
            name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
            if name.startswith(self.prefix + "-"):
                subprocess.run([self.tools["ip"], "link", "del", name], capture_output=True)

    def allocate(self) -> Link:
        """A slot for a new dyno's pair: the longest free one whose last pair the kernel
        has removed (a dyno's namespace, and its pair with it, goes in the background),
        else a new one."""
        for i, slot in enumerate(self._free):
            link = link_for(self.subnet, self.prefix, slot)
            if not _link_exists(link.host_name):
                del self._free[i]
                return link
        link = link_for(self.subnet, self.prefix, self._next)
        self._next += 1
        return link

    def release(self, link: Link) -> None:
        """The dyno is gone: its slot may serve again once its pair is."""
        self._free.append(link.slot)


def _link_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True
