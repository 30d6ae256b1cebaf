"""Dyno start with the bwrap sandbox against the process sandbox, for 1 MB and 200 MB
releases: the median time from a session request (an exec channel on an open SSH
connection) to the command's first output, and the sandbox's own share of it (the
manager's `dyno starting` to `dyno up`).

    .venv/bin/python bench/sandbox_start.py [--reps N] [--sizes 1,200]

Needs root, bubblewrap and slirp4netns (the bwrap gateway runs with its defaults:
overlay /app, outbound network, cgroup limits). Takes a couple of minutes, most of it
making and unpacking the 200 MB slug. The first dyno of each release is reported apart:
for bwrap it makes the release's view (a copy owned by the dyno user), once per release.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.dynostart import make_slug
from bench.servers import Gateway, client_key
from bench.util import MB, Progress, median, say

COMMAND = "echo up"
SANDBOXES = ("process", "bwrap")


async def first_outputs(gateway: Gateway, app: str, reps: int, progress: Progress) -> list[float]:
    """Seconds from opening a session to the first line of `echo up`, 1 + `reps` times
    on one connection (the first is the cold start), each after the last dyno is gone."""
    times = []
    async with await gateway.connect(user=app) as conn:
        for _ in range(reps + 1):
            started = time.perf_counter()
            process = await conn.create_process(COMMAND, encoding=None)
            line = await process.stdout.readline()
            times.append(time.perf_counter() - started)
            await process.wait()
            if line != b"up\n":
                raise RuntimeError(f"{app}: expected 'up', got {line!r}")
            await _dynos_gone(gateway)
            progress.step()
    return times


async def _dynos_gone(gateway: Gateway, timeout: float = 30) -> None:
    dynos = gateway.root / "state" / "dynos"
    deadline = time.monotonic() + timeout
    while dynos.exists() and any(dynos.iterdir()) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def start_gateway(root: Path, key: Path, sandbox: str) -> Gateway:
    gateway = Gateway(root, key)
    gateway.setup()
    text = gateway.config_path.read_text()
    gateway.config_path.write_text(text.replace('sandbox = "process"', f'sandbox = "{sandbox}"'))
    gateway.start()
    return gateway


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=15, help="timed starts per case")
    parser.add_argument("--sizes", default="1,200", help="release sizes in MB")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="sandbox-start-"))
    results: dict[tuple[str, int], dict[str, float]] = {}
    try:
        key = client_key(work)
        slugs = {}
        for size in sizes:
            say(f"making a {size} MB slug (64 KB random files)")
            slugs[size] = make_slug(work / f"start-{size}mb.tgz", size * MB)
        progress = Progress("dyno starts", len(SANDBOXES) * len(sizes) * (args.reps + 1))
        for sandbox in SANDBOXES:
            say(f"starting a gateway with the {sandbox} sandbox")
            gateway = start_gateway(work / sandbox, key, sandbox)
            try:
                for size in sizes:
                    app = f"start-{size}mb"
                    started = time.perf_counter()
                    gateway.add_app(app, slugs[size])
                    say(f"  {app} released in {time.perf_counter() - started:.1f} s")
                    times = asyncio.run(first_outputs(gateway, app, args.reps, progress))
                    share = gateway.sandbox_times(app)
                    results[sandbox, size] = {
                        "cold": times[0] * 1000,
                        "median": median(times[1:]) * 1000,
                        "sandbox": median(share[1:]) * 1000,
                        "cold_sandbox": share[0] * 1000,
                    }
            finally:
                gateway.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(results, sizes, args.reps)
    return 0


def report(results: dict[tuple[str, int], dict[str, float]], sizes: list[int], reps: int) -> None:
    print(f"\nsession request -> first output of `{COMMAND}`, median of {reps} (ms)")
    print(
        f"{'release':>8} | {'process':>8} | {'bwrap':>8} | {'added':>7} | {'ratio':>5} |"
        f" {'sandbox share: process':>23} | {'bwrap':>6} | {'bwrap cold (view)':>17}"
    )
    for size in sizes:
        proc, bwrap = results["process", size], results["bwrap", size]
        print(
            f"{size:>6} MB | {proc['median']:8.1f} | {bwrap['median']:8.1f} |"
            f" {bwrap['median'] - proc['median']:+7.1f} | {bwrap['median'] / proc['median']:5.2f} |"
            f" {proc['sandbox']:23.1f} | {bwrap['sandbox']:6.1f} | {bwrap['cold']:17.1f}"
        )
    flat = [results["bwrap", s]["median"] for s in sizes]
    print(
        f"\nbwrap across release sizes: {min(flat):.1f} .. {max(flat):.1f} ms "
        f"(goal: under 50 ms added to a plain start, flat in the release size)"
    )


if __name__ == "__main__":
    sys.exit(main())
