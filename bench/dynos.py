"""Many dynos at once: each an SSH session (its own connection) running `sleep`. What
each costs beyond its own processes (helper processes, their memory and the server's,
the kernel's), and how fast new sessions start while they run.

For the gateway, a dyno's own processes are its init's descendants (the command); the
helpers are every other process the manager started for dynos (the inits, and any other
helper per dyno), and the server is the manager and the front, with the sandboxes
prepared ahead (a bounded number, `prepared_max`, whatever the dynos running). For sshd,
a session's own processes are its shell's; the helpers are its per-connection sshd
processes, and the server the listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import asyncssh

from bench import proc
from bench.rows import Row
from bench.servers import Gateway, Server, Sshd
from bench.util import Progress, say

SECTION = "running dynos"
HOLD_COMMAND = "echo READY; exec sleep 100000"
OPEN_PARALLEL = 16  # connections being set up at once while filling up
SETTLE = 2.0  # seconds to wait before reading memory
# Issue 15's goals, per running dyno.
HELPERS_GOAL = "<= 1"
PSS_GOAL = "<= 1024"  # KB
RATE_GOAL = ">= 40"  # new sessions per second
KERNEL_FIELDS = ("Slab", "KernelStack", "PageTables")


class Held:
    """The open sessions of one server."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.sessions: list[tuple[asyncssh.SSHClientConnection, asyncssh.SSHClientProcess]] = []

    async def open_one(self) -> None:
        conn = await self.server.connect(keepalive_interval=0)
        process = await conn.create_process(HOLD_COMMAND, encoding=None)
        line = await asyncio.wait_for(process.stdout.readline(), 120)
        if line != b"READY\n":
            raise RuntimeError(f"{self.server.name}: a held session ended: {line!r}")
        self.sessions.append((conn, process))

    async def fill(self, count: int) -> None:
        """Open sessions until `count` are held."""
        wanted = count - len(self.sessions)
        progress = Progress(f"{self.server.name}: starting dynos to {count}", wanted)
        slots = asyncio.Semaphore(OPEN_PARALLEL)

        async def one() -> None:
            async with slots:
                await self.open_one()
                progress.step()

        await asyncio.gather(*(one() for _ in range(wanted)))

    async def close(self) -> None:
        for conn, _ in self.sessions:
            conn.close()
        for conn, _ in self.sessions:
            with contextlib.suppress(Exception):
                await conn.wait_closed()
        self.sessions = []


async def new_session_rate(server: Server, count: int, parallel: int = 4) -> float:
    """Sessions per second: `count` fresh connections each running `true`, `parallel` at
    a time."""
    slots = asyncio.Semaphore(parallel)

    async def one() -> None:
        async with slots, await server.connect() as conn:
            await conn.run("true", check=True)

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    return count / (time.perf_counter() - started)


def parts(server: Server) -> dict[str, list[int]]:
    """The server's processes by role: "server", "helpers", "own" (the dynos')."""
    assert server.process is not None
    top = server.process.pid
    children = proc.children()

    def below(pid: int) -> list[int]:
        return proc.descendants(pid, children)

    roles: dict[str, list[int]] = {"server": [top], "helpers": [], "prepared": [], "own": []}
    if isinstance(server, Gateway):
        front = server.pids().get("front")
        for pid in children.get(top, []):
            if pid == front:
                roles["server"] += [pid, *below(pid)]
            elif proc.comm(pid) == "dyno-init" and not children.get(pid):
                roles["prepared"].append(pid)  # a sandbox waiting for its session
            else:  # a dyno's init (or any other helper), and the dyno below it
                roles["helpers"].append(pid)
                roles["own"] += below(pid)
    else:  # sshd: per connection a monitor (root) and a session process (the user's)
        for pid in below(top):
            (roles["helpers"] if proc.comm(pid) == "sshd" else roles["own"]).append(pid)
    return roles


def kernel_kb() -> int:
    """Kernel memory the dynos' namespaces, mounts, stacks and page tables show in."""
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        fields[name] = int(rest.split()[0])
    return sum(fields[name] for name in KERNEL_FIELDS)


def snapshot(server: Server) -> dict[str, float]:
    roles = parts(server)
    server_mem = proc.total(roles["server"] + roles["prepared"])
    helper_mem = proc.total(roles["helpers"])
    return {
        "server_pss": server_mem.pss,
        "server_rss": server_mem.rss,
        "helper_pss": helper_mem.pss,
        "helper_rss": helper_mem.rss,
        "helpers": len(roles["helpers"]),
        "prepared": len(roles["prepared"]),  # a fixed number, not per dyno
        "own": len(roles["own"]),
        "kernel_kb": kernel_kb(),
    }


async def _measure(server: Server, levels: list[int], new: int) -> list[dict[str, float]]:
    """Per level: helpers and memory per dyno above the idle server, the new-session
    rate; level 0 first (no dyno running)."""
    await asyncio.sleep(SETTLE)
    base = snapshot(server)
    held = Held(server)
    results = []
    try:
        for level in [0, *levels]:
            await held.fill(level)
            await asyncio.sleep(SETTLE)
            now = snapshot(server)
            rate = await new_session_rate(server, new)
            result: dict[str, float] = {"dynos": level, "new_per_s": rate, **now}
            if level:
                result["helpers_per_dyno"] = (now["helpers"] - base["helpers"]) / level
                result["pss_per_dyno_kb"] = (
                    (
                        now["server_pss"]
                        + now["helper_pss"]
                        - base["server_pss"]
                        - base["helper_pss"]
                    )
                    / level
                    / 1024
                )
                result["rss_per_dyno_kb"] = (
                    (
                        now["server_rss"]
                        + now["helper_rss"]
                        - base["server_rss"]
                        - base["helper_rss"]
                    )
                    / level
                    / 1024
                )
                result["kernel_per_dyno_kb"] = (now["kernel_kb"] - base["kernel_kb"]) / level
                say(
                    f"  {server.name}: {level} running, "
                    f"{result['helpers_per_dyno']:.2f} helpers and "
                    f"{result['pss_per_dyno_kb']:.0f} KB PSS per dyno, "
                    f"{result['kernel_per_dyno_kb']:.0f} KB kernel, {rate:.1f} new sessions/s"
                )
            results.append(result)
    finally:
        await held.close()
    return results


def rows(sshd: Sshd, gateway: Gateway, levels: list[int], new: int) -> list[Row]:
    proc.raise_fd_limit()
    results = {s.name: asyncio.run(_measure(s, levels, new)) for s in (sshd, gateway)}
    out = [
        Row(
            SECTION,
            "new sessions/s, no dyno running",
            "1/s",
            results["sshd"][0]["new_per_s"],
            results["gateway"][0]["new_per_s"],
            higher_is_better=True,
            x=0,
            detail={"sshd": results["sshd"][0], "gateway": results["gateway"][0]},
        )
    ]
    for i, level in enumerate(levels, start=1):
        s, g = results["sshd"][i], results["gateway"][i]
        detail = {"sshd": s, "gateway": g}
        out += [
            Row(SECTION, f"helper processes per dyno, {level} running", "", s["helpers_per_dyno"],
                g["helpers_per_dyno"], goal=HELPERS_GOAL, goal_value=g["helpers_per_dyno"],
                x=level, detail=detail),
            Row(SECTION, f"memory (PSS) per dyno beyond its own, {level} running", "KB",
                s["pss_per_dyno_kb"], g["pss_per_dyno_kb"], goal=PSS_GOAL,
                goal_value=g["pss_per_dyno_kb"], x=level),
            Row(SECTION, f"kernel memory per dyno, {level} running", "KB",
                s["kernel_per_dyno_kb"], g["kernel_per_dyno_kb"], x=level),
            Row(SECTION, f"new sessions/s, {level} running", "1/s", s["new_per_s"],
                g["new_per_s"], higher_is_better=True, goal=RATE_GOAL,
                goal_value=g["new_per_s"], x=level),
        ]  # fmt: skip
    return out
