"""A network namespace joined to this one by a veth pair: the test host the network
tests (and bench/outbound.py) talk to, never the machine's own interfaces."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator


@contextlib.contextmanager
def veth_namespace(name: str, veth: str, gateway: str, address: str) -> Iterator[None]:
    """Namespace `name` with `address`/30 on its eth0, whose peer `veth` here has
    `gateway`/30 and is its default route; both go when the block ends."""
    commands = [
        ["ip", "netns", "add", name],
        ["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name],
        ["ip", "addr", "add", f"{gateway}/30", "dev", veth],
        ["ip", "link", "set", veth, "up"],
        ["ip", "-n", name, "addr", "add", f"{address}/30", "dev", "eth0"],
        ["ip", "-n", name, "link", "set", "eth0", "up"],
        ["ip", "-n", name, "link", "set", "lo", "up"],
        ["ip", "-n", name, "route", "add", "default", "via", gateway],
    ]
    try:
        for argv in commands:
            subprocess.run(argv, check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
