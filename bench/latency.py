"""Session latency (a fresh `ssh host true`; exec channels on one connection) and keystroke
echo latency through a PTY."""

from __future__ import annotations

import asyncio
import subprocess
import time

from bench.rows import Row
from bench.servers import Server
from bench.util import Progress, median, percentile

SECTION = "session latency"
KEYS = "keystroke echo"
# Raw mode: each byte goes to `cat` and straight back, as in an editor or a REPL.
ECHO_COMMAND = "stty raw -echo; echo READY; exec cat"


def ssh_true(server: Server) -> float:
    """Seconds for the OpenSSH client to connect, run `true` and exit."""
    started = time.perf_counter()
    result = subprocess.run(server.ssh_argv("true"), capture_output=True, timeout=60)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{server.name}: ssh true failed: {result.stderr.decode()}")
    return elapsed


def fresh_connections(servers: list[Server], count: int) -> dict[str, list[float]]:
    """`ssh host true` `count` times per server, alternating servers to share the noise."""
    times: dict[str, list[float]] = {server.name: [] for server in servers}
    for server in servers:
        ssh_true(server)  # warm caches (binaries, keys) before timing
    progress = Progress("ssh host true, fresh connections", count * len(servers))
    for _ in range(count):
        for server in servers:
            times[server.name].append(ssh_true(server))
            progress.step()
    return times


async def _exec_channels(server: Server, count: int, progress: Progress) -> list[float]:
    times = []
    async with await server.connect() as conn:
        await conn.run("true", check=True)
        for _ in range(count):
            started = time.perf_counter()
            await conn.run("true", check=True)
            times.append(time.perf_counter() - started)
            progress.step()
    return times


def exec_channels(servers: list[Server], count: int) -> dict[str, list[float]]:
    """`true` on exec channels of one persistent asyncssh connection, per server."""
    progress = Progress("exec true on one connection", count * len(servers))
    return {s.name: asyncio.run(_exec_channels(s, count, progress)) for s in servers}


def session_rows(servers: list[Server], fresh: int, execs: int) -> list[Row]:
    first = fresh_connections(servers, fresh)
    second = exec_channels(servers, execs)
    rows = []
    for label, times, count in (
        ("`ssh host true`, fresh connection", first, fresh),
        ("exec `true`, one persistent connection", second, execs),
    ):
        rows.append(
            Row(
                SECTION,
                label,
                "ms",
                median(times["sshd"]) * 1000,
                median(times["gateway"]) * 1000,
                goal="<= 0.5",
                detail={"count": count, "samples_ms": _ms(times)},
            )
        )
    return rows


async def _keystrokes(server: Server, count: int, gap: float, progress: Progress) -> list[float]:
    """Send one byte at a time to `cat` on a raw PTY; time each until it comes back."""
    times = []
    async with await server.connect() as conn:
        process = await conn.create_process(ECHO_COMMAND, term_type="xterm", encoding=None)
        seen = b""
        while b"READY\n" not in seen:
            chunk = await asyncio.wait_for(process.stdout.read(1024), 30)
            if not chunk:
                raise RuntimeError(f"{server.name}: the echo session ended early: {seen!r}")
            seen += chunk
        for i in range(count):
            key = b"abcdefghij"[i % 10 : i % 10 + 1]
            started = time.perf_counter()
            process.stdin.write(key)
            echoed = await asyncio.wait_for(process.stdout.read(1), 10)
            times.append(time.perf_counter() - started)
            if echoed != key:
                raise RuntimeError(f"{server.name}: sent {key!r}, got {echoed!r}")
            progress.step()
            await asyncio.sleep(gap)
        process.close()
    return times


def keystroke_rows(servers: list[Server], count: int, gap: float = 0.005) -> list[Row]:
    progress = Progress("keystrokes through a PTY", count * len(servers))
    times = {s.name: asyncio.run(_keystrokes(s, count, gap, progress)) for s in servers}
    return [
        Row(
            KEYS,
            f"keystroke echo p{p}",
            "ms",
            percentile(times["sshd"], p) * 1000,
            percentile(times["gateway"], p) * 1000,
            detail={"count": count, "samples_ms": _ms(times)} if p == 50 else {},
        )
        for p in (50, 99)
    ]


def _ms(times: dict[str, list[float]]) -> dict[str, list[float]]:
    return {name: [round(t * 1000, 3) for t in values] for name, values in times.items()}
