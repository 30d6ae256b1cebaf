"""CPU per session: where the time of a session start goes, server by server.

    .venv/bin/python bench/session_cpu.py            # ~1 min; --fresh N, --execs N

Starts sshd and the gateway (its default sandbox) as bench/run.py does, then for each
runs `true` on fresh OpenSSH connections and on exec channels of one asyncssh
connection, and prints the CPU each took per session: the server's processes (every
process below the server's first, alive or reaped meanwhile), the gateway's split by
process (manager, front, the dynos' inits and commands), and the client's. On 2 cores a
session start is CPU bound, so these explain the latency rows of bench/run.py
(docs/benchmarks.md, "The gaps left").
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `gateway` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import proc
from bench.servers import Gateway, Server, Sshd, client_key
from bench.util import Progress, median, say


def cpu_seconds(pid: int, reaped: bool = True) -> float:
    """proc.cpu_seconds, with 0 for a process gone meanwhile."""
    try:
        return proc.cpu_seconds(pid, reaped)
    except OSError:
        return 0.0


def tree_cpu(top: int) -> dict[int, float]:
    """CPU seconds of `top` and every process below it, by pid."""
    return {pid: cpu_seconds(pid) for pid in [top, *proc.descendants(top)]}


def used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU spent between two snapshots: grown by those in both, all of those new. One
    that ended meanwhile was reaped by one of them, whose children's time grew by its
    whole life: what it had spent before the first snapshot is taken off."""
    gone = sum(value for pid, value in before.items() if pid not in after)
    return sum(value - before.get(pid, 0.0) for pid, value in after.items()) - gone


def client_cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Measure:
    """CPU of a server's tree (and, for the gateway, of its parts) and of the client."""

    def __init__(self, server: Server) -> None:
        assert server.process is not None
        self.top = server.process.pid
        self.parts = server.pids() if isinstance(server, Gateway) else {}

    def __enter__(self) -> Measure:
        self.tree = tree_cpu(self.top)
        self.parts_before = {name: cpu_seconds(pid, False) for name, pid in self.parts.items()}
        self.client = client_cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        self.client = client_cpu() - self.client
        self.server_cpu = used(self.tree, tree_cpu(self.top))
        self.by_part = {
            name: cpu_seconds(pid, False) - self.parts_before[name]
            for name, pid in self.parts.items()
        }


def fresh(server: Server, count: int) -> tuple[Measure, list[float]]:
    argv = server.ssh_argv("true")
    for _ in range(5):
        subprocess.run(argv, check=True, capture_output=True)
    times = []
    progress = Progress(f"{server.name}: fresh `ssh true`", count)
    with Measure(server) as measure:
        for _ in range(count):
            started = time.perf_counter()
            subprocess.run(argv, check=True, capture_output=True)
            times.append(time.perf_counter() - started)
            progress.step()
    return measure, times


async def execs(server: Server, count: int) -> tuple[Measure, list[float]]:
    times = []
    async with await server.connect() as conn:
        for _ in range(10):
            await conn.run("true", check=True)
        progress = Progress(f"{server.name}: exec `true` on one connection", count)
        with Measure(server) as measure:
            for _ in range(count):
                started = time.perf_counter()
                await conn.run("true", check=True)
                times.append(time.perf_counter() - started)
                progress.step()
    return measure, times


def report(kind: str, results: dict[str, tuple[Measure, list[float]]]) -> None:
    print(f"\n{kind} (per session, ms)")
    print("| server | latency p50 | server CPU | client CPU | split |")
    print("|---|---:|---:|---:|---|")
    for name, (measure, times) in results.items():
        n = len(times)
        split = ", ".join(
            f"{part} {value / n * 1000:.1f}" for part, value in measure.by_part.items()
        )
        if measure.by_part:
            rest = measure.server_cpu - sum(measure.by_part.values())
            split += f", dynos (inits, commands) {rest / n * 1000:.1f}"
        print(
            f"| {name} | {median(times) * 1000:.1f} | {measure.server_cpu / n * 1000:.1f}"
            f" | {measure.client / n * 1000:.1f} | {split} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fresh", type=int, default=200, help="fresh connections per server")
    parser.add_argument("--execs", type=int, default=1000, help="exec channels per server")
    args = parser.parse_args()
    proc.raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="gateway-session-cpu-") as work_dir:
        work = Path(work_dir)
        key = client_key(work)
        servers: list[Server] = [Sshd(work / "sshd", key), Gateway(work / "gateway", key)]
        say(f"starting sshd and the gateway (work dir {work})")
        for server in servers:
            server.start()
        try:
            report("fresh `ssh host true`", {s.name: fresh(s, args.fresh) for s in servers})
            report(
                "exec `true` on an open connection (asyncssh)",
                {s.name: asyncio.run(execs(s, args.execs)) for s in servers},
            )
        finally:
            for server in servers:
                server.stop()


if __name__ == "__main__":
    main()
