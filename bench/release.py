"""The first dyno of a new release, against the release's size, and the disk a release
takes while its dynos run.

Each size is an app of its own whose slug holds `size` bytes of random (incompressible)
data in 64 KB files, as an app's assets and vendored libraries would. Each repetition
creates a new release (`releases:create`, which unpacks it) and times its first dyno:
from opening a session (an exec channel on an open connection) to the first output of
`echo up`, next to sshd starting the same command. Nothing can have been made ahead for
a release that did not exist, so this is the cold start.
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

SECTION = "new release"
FILE_SIZE = 64 * 1024
COMMAND = "echo up"
START_GOAL = "<= 100"  # ms for the first dyno of a new release, whatever its size
DISK_GOAL = "<= 1"  # MB a running dyno adds on disk: no copy of its release


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


def disk_bytes(path: Path) -> int:
    """Bytes on disk under `path` (allocated blocks, each inode once), as `du` counts."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames, "."]:
            try:
                info = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            if (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                total += info.st_blocks * 512
    return total


async def first_output(server: Server, user: str) -> float:
    """Seconds from opening a session to the first line of `echo up`, on a connection
    opened beforehand."""
    async with await server.connect(user=user) as conn:
        started = time.perf_counter()
        process = await conn.create_process(COMMAND, encoding=None)
        line = await process.stdout.readline()
        elapsed = time.perf_counter() - started
        await process.wait()
    if line != b"up\n":
        raise RuntimeError(f"{server.name}: expected 'up', got {line!r}")
    return elapsed


async def _sshd_starts(sshd: Server, reps: int) -> list[float]:
    async with await sshd.connect() as conn:
        times = []
        for _ in range(reps + 1):
            started = time.perf_counter()
            process = await conn.create_process(COMMAND, encoding=None)
            await process.stdout.readline()
            times.append(time.perf_counter() - started)
            await process.wait()
    return times[1:]  # the first warms up


async def _disk_while_running(gateway: Gateway, app: str) -> dict[str, float]:
    """What the state dir takes on disk before and while one dyno of the app's latest
    release runs, and what its release and slug archive take."""
    state = gateway.root / "state"
    release = max((state / "releases" / app).iterdir(), key=lambda p: int(p.name[1:]))
    # The last dyno's dir goes once it has ended (the process sandbox's copy with it).
    deadline = time.monotonic() + 60
    while disk_bytes(state / "dynos") > MB and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    before = disk_bytes(state)
    async with await gateway.connect(user=app) as conn:
        process = await conn.create_process("echo up; exec sleep 600", encoding=None)
        await process.stdout.readline()
        during = disk_bytes(state)
        process.terminate()
        process.close()
    return {
        "added_by_dyno_mb": (during - before) / MB,
        "release_mb": disk_bytes(release) / MB,
        "slugs_mb": disk_bytes(state / "slugs") / MB,  # archives kept (none with SQLite)
        "state_mb": during / MB,
    }


def rows(
    sshd: Server, gateways: list[Gateway], sizes_mb: list[int], reps: int, work: Path
) -> list[Row]:
    """Per release size and gateway: the first dyno of a new release (median of `reps`
    releases) against sshd's start of the same command; per gateway, the disk a dyno
    of the largest release adds while it runs."""
    progress = Progress("first dynos of new releases", reps * (len(sizes_mb) * len(gateways) + 1))
    baseline = asyncio.run(_sshd_starts(sshd, reps))
    progress.step(reps)
    base_ms = median(baseline) * 1000
    out: list[Row] = []
    disk: dict[str, dict[str, float]] = {}
    for size in sizes_mb:
        say(f"  making a {size} MB slug")
        slug = make_slug(work / f"release-{size}mb.tgz", size * MB)
        for gateway in gateways:
            app = f"release-{size}mb"
            gateway.cli("apps:create", app)
            gateway.cli("keys:add", app, str(gateway.key) + ".pub")
            times, unpack = [], []
            for _ in range(reps):
                started = time.perf_counter()
                gateway.cli("releases:create", app, str(slug))
                unpack.append(time.perf_counter() - started)
                times.append(asyncio.run(first_output(gateway, app)))
                progress.step()
            sandbox = gateway.sandbox_times(app)
            if size == max(sizes_mb):
                disk[gateway.name] = asyncio.run(_disk_while_running(gateway, app))
            process = gateway.sandbox != "namespaces"
            out.append(
                Row(
                    SECTION,
                    f"first dyno of a new release, {size} MB"
                    + (f", {gateway.sandbox} sandbox" if process else ""),
                    "ms",
                    base_ms,
                    median(times) * 1000,
                    goal="" if process else START_GOAL,
                    goal_value=None if process else median(times) * 1000,
                    x=size,
                    detail={
                        "sandbox_ms": median(sandbox) * 1000 if sandbox else None,
                        "releases_create_s": [round(t, 2) for t in unpack],
                        "samples_ms": {
                            "sshd": [round(t * 1000, 2) for t in baseline],
                            gateway.name: [round(t * 1000, 2) for t in times],
                            "sandbox": [round(t * 1000, 2) for t in sandbox],
                        },
                    },
                )
            )
        slug.unlink()
    size = max(sizes_mb)
    for gateway in gateways:
        parts = disk[gateway.name]
        process = gateway.sandbox != "namespaces"
        out.append(
            Row(
                SECTION,
                f"disk a running dyno adds, {size} MB release"
                + (f", {gateway.sandbox} sandbox" if process else ""),
                "MB",
                float("nan"),
                parts["added_by_dyno_mb"],
                goal="" if process else DISK_GOAL,
                goal_value=None if process else parts["added_by_dyno_mb"],
                note="" if not process else "a copy of the release per dyno",
                detail=parts,
            )
        )
    return out
