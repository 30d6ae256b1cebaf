"""Interactive sessions held open (a PTY running `cat`, one connection each): the server's
memory per session, and how fast new sessions start while they are open."""

from __future__ import annotations

import asyncio
import contextlib
import time

import asyncssh

from bench import proc
from bench.rows import Row
from bench.servers import Server
from bench.util import MB, Progress, say

SECTION = "concurrency"
HOLD_COMMAND = "echo READY; exec cat"
OPEN_PARALLEL = 16  # connections being set up at once while filling up
SETTLE = 2.0  # seconds to wait before reading memory


class Held:
    """The open sessions of one server."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.sessions: list[tuple[asyncssh.SSHClientConnection, asyncssh.SSHClientProcess]] = []

    async def open_one(self) -> None:
        conn = await self.server.connect(keepalive_interval=0)
        process = await conn.create_process(HOLD_COMMAND, term_type="xterm", encoding=None)
        seen = b""
        while b"READY" not in seen:
            chunk = await asyncio.wait_for(process.stdout.read(1024), 60)
            if not chunk:
                raise RuntimeError(f"{self.server.name}: a held session ended: {seen!r}")
            seen += chunk
        self.sessions.append((conn, process))

    async def fill(self, count: int) -> None:
        """Open sessions until `count` are held."""
        wanted = count - len(self.sessions)
        progress = Progress(f"{self.server.name}: opening sessions to {count}", wanted)
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


async def _measure(server: Server, levels: list[int], new: int) -> list[dict[str, float]]:
    """Per level: memory above the idle server, per session, and the new-session rate."""
    await asyncio.sleep(SETTLE)
    base = server.memory()
    held = Held(server)
    results = []
    try:
        for level in levels:
            await held.fill(level)
            await asyncio.sleep(SETTLE)
            now = server.memory()
            rate = await new_session_rate(server, new)
            result: dict[str, float] = {"sessions": level, "new_per_s": rate}
            for part in now:
                result[f"{part}_rss_mb"] = now[part].rss / MB
                result[f"{part}_rss_per_session_kb"] = (
                    (now[part].rss - base[part].rss) / level / 1024
                )
            total, total_base = _sum(now), _sum(base)
            result["rss_per_session_kb"] = (total.rss - total_base.rss) / level / 1024
            result["pss_per_session_kb"] = (total.pss - total_base.pss) / level / 1024
            say(
                f"  {server.name}: {level} held, {result['rss_per_session_kb']:.0f} KB RSS "
                f"({result['pss_per_session_kb']:.0f} KB PSS) per session, "
                f"{rate:.1f} new sessions/s"
            )
            results.append(result)
    finally:
        await held.close()
    return results


def _sum(parts: dict[str, proc.Memory]) -> proc.Memory:
    total = proc.Memory()
    for memory in parts.values():
        total += memory
    return total


def rows(servers: list[Server], levels: list[int], new: int) -> list[Row]:
    """Rows per level: PSS per session (the fair measure across process models: sshd's
    forked processes share pages) and new sessions per second."""
    proc.raise_fd_limit()
    results = {s.name: asyncio.run(_measure(s, levels, new)) for s in servers}
    out = []
    for i, level in enumerate(levels):
        sshd, gateway = results["sshd"][i], results["gateway"][i]
        out.append(
            Row(
                SECTION,
                f"memory per session, {level} held",
                "KB",
                sshd["pss_per_session_kb"],
                gateway["pss_per_session_kb"],
                # Today's goal, on the gateway's RSS (manager and front): 1 MB a session.
                goal="<= 1024",
                goal_value=gateway["rss_per_session_kb"],
                x=level,
                detail={"sshd": sshd, "gateway": gateway},
            )
        )
        out.append(
            Row(
                SECTION,
                f"new sessions/s, {level} held",
                "1/s",
                sshd["new_per_s"],
                gateway["new_per_s"],
                higher_is_better=True,
                x=level,
            )
        )
    return out
