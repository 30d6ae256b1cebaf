"""Session latency (a fresh `ssh host true`; `true` as a new session on an open connection,
both over asyncssh exec channels and OpenSSH's ControlMaster) and keystroke echo latency
through a PTY."""

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
# Issue 15's goals, as ratios gateway/sshd.
FRESH_GOAL = "<= 0.15"
OPEN_GOAL = "<= 2"


def ssh_true(server: Server, options: tuple[str, ...] = ()) -> float:
    """Seconds for the OpenSSH client to connect (or use its control master), run `true`
    and exit."""
    started = time.perf_counter()
    result = subprocess.run(server.ssh_argv("true", options=options), capture_output=True,
                            timeout=60)  # fmt: skip
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


def control_master(servers: list[Server], count: int) -> dict[str, list[float]]:
    """`ssh -S SOCKET host true` through a ControlMaster connection per server: one new
    session on an open connection each, the servers alternating."""
    times: dict[str, list[float]] = {server.name: [] for server in servers}
    progress = Progress("ssh host true through a ControlMaster", count * len(servers))
    masters = [server.control_master() for server in servers]
    options = [master.__enter__() for master in masters]
    try:
        for server, opts in zip(servers, options, strict=True):
            ssh_true(server, opts)  # the first session on each, untimed
        for _ in range(count):
            for server, opts in zip(servers, options, strict=True):
                times[server.name].append(ssh_true(server, opts))
                progress.step()
    finally:
        for master in masters:
            master.__exit__(None, None, None)
    return times


def exec_channels(servers: list[Server], count: int) -> dict[str, list[float]]:
    """`true` on exec channels of one persistent asyncssh connection per server, in
    rounds of 10 per server so that the servers share the machine's noise."""
    progress = Progress("exec true on one connection", count * len(servers))
    times: dict[str, list[float]] = {server.name: [] for server in servers}

    async def run() -> None:
        conns = [await server.connect() for server in servers]
        try:
            for conn in conns:
                await conn.run("true", check=True)  # untimed
            for _ in range(0, count, 10):
                for server, conn in zip(servers, conns, strict=True):
                    for _ in range(10):
                        started = time.perf_counter()
                        await conn.run("true", check=True)
                        times[server.name].append(time.perf_counter() - started)
                        progress.step()
        finally:
            for conn in conns:
                conn.close()

    asyncio.run(run())
    return times


def session_rows(servers: list[Server], fresh: int, execs: int) -> list[Row]:
    """Rows for the default sandbox (`gateway`, with issue 15's goals), then the same for
    every other gateway in `servers` (the process sandbox), for comparison."""
    measured = (
        ("`ssh host true`, fresh connection", fresh_connections(servers, fresh), fresh,
         FRESH_GOAL),
        ("exec `true` on an open connection (asyncssh)", exec_channels(servers, execs), execs,
         OPEN_GOAL),
        ("`ssh host true` through a ControlMaster", control_master(servers, execs // 2),
         execs // 2, OPEN_GOAL),
    )  # fmt: skip
    rows = []
    for gateway in [s.name for s in servers if s.name.startswith("gateway")]:
        suffix = "" if gateway == "gateway" else f", {gateway.removeprefix('gateway-')} sandbox"
        for label, times, count, goal in measured:
            rows.append(
                Row(
                    SECTION,
                    label + suffix,
                    "ms",
                    median(times["sshd"]) * 1000,
                    median(times[gateway]) * 1000,
                    goal=goal if gateway == "gateway" else "",
                    detail={"count": count, "samples_ms": _ms(times, ("sshd", gateway))},
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


def _ms(
    times: dict[str, list[float]], names: tuple[str, ...] | None = None
) -> dict[str, list[float]]:
    return {name: [round(t * 1000, 3) for t in times[name]] for name in names or tuple(times)}
