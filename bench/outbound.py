"""Outbound throughput from a dyno: its bytes go through its veth pair and the host's
NAT (the namespaces sandbox), against the same command in an sshd session, which sends
straight from the host. Both send to a test host in a network namespace this bench
makes, joined to the host by a veth pair with addresses from 198.18.0.0/15 (RFC 2544,
for benchmarks): nothing leaves the machine.

The test host runs a sink that reads each connection to its end; the rate is the bytes
over the time from its first byte to its end, as the sink saw them.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from bench.rows import Row
from bench.servers import Server
from bench.util import MB, Progress, median
from tests.netns import veth_namespace

SECTION = "outbound"
SINK = r"""
import socket, sys, time
server = socket.create_server(("0.0.0.0", 0))
print(server.getsockname()[1], flush=True)
buffer = bytearray(1 << 20)
while True:
    conn, _ = server.accept()
    total, first = 0, None
    while n := conn.recv_into(buffer):
        first = first or time.perf_counter()
        total += n
    print(total, time.perf_counter() - (first or time.perf_counter()), flush=True)
    conn.close()
"""


@dataclass
class TestHost:
    name: str
    address: str  # the test host's
    gateway: str  # this host's end of the pair
    sink: subprocess.Popen[str]
    port: int

    def received(self) -> tuple[int, float]:
        """Bytes and seconds of the sink's next finished connection."""
        assert self.sink.stdout is not None
        total, seconds = self.sink.stdout.readline().split()
        return int(total), float(seconds)


@contextlib.contextmanager
def test_host() -> Iterator[TestHost]:
    """A network namespace joined to this one by a veth pair, with a sink listening. Its
    /30 of 198.19.0.0/16 comes from this process's pid, clear of the test suite's
    198.18.0.0/30 and of other runs."""
    tag = os.getpid() % 16384
    base = f"198.19.{tag * 4 // 256}.{tag * 4 % 256}"
    prefix = base.rsplit(".", 1)[0]
    last = int(base.rsplit(".", 1)[1])
    gateway, address = f"{prefix}.{last + 1}", f"{prefix}.{last + 2}"
    name, veth = f"gwbench{tag}", f"gwb{tag}"
    with veth_namespace(name, veth, gateway, address):
        sink = subprocess.Popen(
            ["ip", "netns", "exec", name, sys.executable, "-c", SINK],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        try:
            assert sink.stdout is not None
            port = int(sink.stdout.readline())
            yield TestHost(name, address, gateway, sink, port)
        finally:
            sink.kill()
            sink.wait()


def send(server: Server, host: TestHost, size: int) -> float:
    """MB/s of `size` bytes of zeros sent from a session of `server` to the test host."""
    command = f"head -c {size} /dev/zero > /dev/tcp/{host.address}/{host.port}"
    result = subprocess.run(server.ssh_argv(command), capture_output=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"{server.name}: sending to the test host failed: {result.stderr!r}")
    received, seconds = host.received()
    if received != size:
        raise RuntimeError(f"{server.name}: the test host got {received} of {size} bytes")
    return size / MB / max(seconds, 1e-6)


def rows(servers: list[Server], size: int, reps: int) -> list[Row]:
    """MB/s to the test host, median of `reps`, servers alternating."""
    rates: dict[str, list[float]] = {s.name: [] for s in servers}
    progress = Progress(f"outbound, {size // MB} MB to a test host", reps * len(servers))
    with test_host() as host:
        for _ in range(reps):
            for server in servers:
                rates[server.name].append(send(server, host, size))
                progress.step()
    return [
        Row(
            SECTION,
            f"TCP out to a test host in a network namespace, {size // MB} MB",
            "MB/s",
            median(rates["sshd"]),
            median(rates["gateway"]),
            higher_is_better=True,
            note="reported (sshd sends from the host; a dyno through its veth pair and NAT)",
            detail={
                "size_bytes": size,
                "samples_mb_s": {k: [round(v, 1) for v in r] for k, r in rates.items()},
            },
        )
    ]
