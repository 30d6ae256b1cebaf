"""Dyno start cost against release size: the time from asking for a session to the
command's first output, with the process sandbox, next to sshd starting the same command.

Each release is an app of its own whose slug holds `size` bytes of random (incompressible)
data in 64 KB files, as an app's assets and vendored libraries would. The manager's log
gives the sandbox's share: `dyno starting` to `dyno up` (the release copy and the spawn).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tarfile
import time
from pathlib import Path

from bench.rows import Row
from bench.servers import Gateway, Server
from bench.util import MB, Progress, median, say

SECTION = "dyno start"
FILE_SIZE = 64 * 1024
COMMAND = "echo up"


def make_slug(path: Path, size: int, file_size: int = FILE_SIZE) -> Path:
    """A slug of `size` bytes of random data in `file_size` files (gzip level 1: the data
    does not compress, so spend no time trying)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    source = path.with_suffix(".src")
    (source / "data").mkdir(parents=True, exist_ok=True)
    (source / "Procfile").write_text("web: python3 -m http.server $PORT\n")
    for i, offset in enumerate(range(0, size, file_size)):
        (source / "data" / f"{i:06d}.bin").write_bytes(os.urandom(min(file_size, size - offset)))
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for child in sorted(source.iterdir()):
            tar.add(child, arcname=child.name)
    shutil.rmtree(source)
    return path


async def _first_output(server: Server, user: str, reps: int, progress: Progress) -> list[float]:
    """Seconds from opening a session to the first line of `echo up`, `reps` times on one
    connection; after each, waits until the gateway has removed the dyno's copy."""
    times = []
    async with await server.connect(user=user) as conn:
        for i in range(reps + 1):  # the first is a warm-up
            started = time.perf_counter()
            process = await conn.create_process(COMMAND, encoding=None)
            line = await process.stdout.readline()
            elapsed = time.perf_counter() - started
            await process.wait()
            if line != b"up\n":
                raise RuntimeError(f"{server.name}: expected 'up', got {line!r}")
            if i:
                times.append(elapsed)
                progress.step()
            if isinstance(server, Gateway):
                await _dynos_removed(server)
    return times


async def _dynos_removed(gateway: Gateway, timeout: float = 60) -> None:
    dynos = gateway.root / "state" / "dynos"
    deadline = time.monotonic() + timeout
    while dynos.exists() and any(dynos.iterdir()) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


def rows(sshd: Server, gateway: Gateway, sizes_mb: list[int], reps: int, work: Path) -> list[Row]:
    """A row per release size: gateway start (median) against sshd's, and the sandbox's
    share from the manager's log, held to today's goal of 50 ms."""
    apps = {}
    for size in sizes_mb:
        app = f"start-{size}mb"
        say(f"  making a {size} MB release ({app})")
        started = time.perf_counter()
        slug = make_slug(work / f"{app}.tgz", size * MB)
        gateway.add_app(app, slug)
        slug.unlink()
        say(f"  {app} released in {time.perf_counter() - started:.1f} s")
        apps[size] = app
    progress = Progress("dyno starts", reps * (len(sizes_mb) + 1))
    baseline = asyncio.run(_first_output(sshd, sshd.user, reps, progress))
    out = []
    for size in sizes_mb:
        times = asyncio.run(_first_output(gateway, apps[size], reps, progress))
        sandbox = gateway.sandbox_times(apps[size])[1:]  # as above, without the warm-up
        out.append(
            Row(
                SECTION,
                f"start, {size} MB release",
                "ms",
                median(baseline) * 1000,
                median(times) * 1000,
                goal="<= 50",
                goal_value=median(sandbox) * 1000,
                x=size,
                detail={
                    "sandbox_ms": median(sandbox) * 1000,
                    "samples_ms": {
                        "sshd": [round(t * 1000, 2) for t in baseline],
                        "gateway": [round(t * 1000, 2) for t in times],
                        "sandbox": [round(t * 1000, 2) for t in sandbox],
                    },
                },
            )
        )
    return out
