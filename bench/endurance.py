"""Endurance: 20,000 sessions later, nothing has grown (issue 17).

    .venv/bin/python bench/endurance.py                    # 20,000 sessions: docs/benchmarks/
    .venv/bin/python bench/endurance.py --sessions 2000    # a shorter run: bench/results/

Starts `gateway serve` with the default sandbox (namespaces, as root) and the sample app,
then runs sessions through real OpenSSH clients (bench/endurance_sessions.py: exec, PTY,
detached and dropped, through ControlMaster connections and fresh ones), `--workers` at
a time. Every `--every` sessions it stops, waits until no dyno runs and the gateway has
settled, and samples what an operator would watch (bench/endurance_sample.py). The
first interval is the warm-up; the goals are judged from the checkpoint after it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `gateway` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import proc, report
from bench.endurance_report import (
    Checkpoint,
    growth,
    markdown_table,
    one_line,
    text_table,
    verdicts,
)
from bench.endurance_sample import Sample, sample
from bench.endurance_sessions import MIX, Mix, Result
from bench.servers import APP, REPO, Gateway, client_key
from bench.util import Progress, say

FULL = 20_000
PROBE = 40  # sessions timed one after another at each checkpoint, on the settled gateway
COMPARE = 200  # at the end: probe sessions on the long-run and on a fresh gateway, in turn
SETTLE_TIMEOUT = 120.0  # seconds a checkpoint waits for the gateway to settle
# SQLite checkpoints the WAL once it holds 1000 pages (4 KB each by default); the file
# keeps its largest size, which a transaction's pages may take past the threshold.
WAL_BOUND = 8 * 1024 * 1024


class EnduranceGateway(Gateway):
    """The bench's gateway with the default sandbox and dyno limits (`dynos`: settings
    of its own, such as another subnet for a second gateway beside the first)."""

    def __init__(self, root: Path, key: Path, dynos: dict[str, object] | None = None) -> None:
        super().__init__(root, key)
        self.dynos = dynos or {}

    def settings(self) -> dict[str, dict[str, object]]:
        tables = super().settings()
        tables["dynos"] = dict(self.dynos)
        return tables


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=FULL, help=f"in all (default {FULL})")
    parser.add_argument("--every", type=int, default=1000, help="sessions between checkpoints")
    parser.add_argument("--workers", type=int, default=4, help="clients at once (default 4)")
    parser.add_argument(
        "--probe", type=int, default=PROBE, help=f"sessions timed at each checkpoint ({PROBE})"
    )
    parser.add_argument(
        "--compare", type=int, default=COMPARE,
        help=f"sessions timed at the end on each of this and a fresh gateway ({COMPARE})",
    )  # fmt: skip
    parser.add_argument(
        "--max-minutes", type=float, default=120, help="stop starting intervals after this"
    )
    parser.add_argument("--out", type=Path, help="where results go (default by --sessions)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, state)")
    args = parser.parse_args(argv)
    if args.sessions < 2 * args.every or args.every < len(MIX):
        parser.error(f"--sessions must be at least 2 x --every, and --every >= {len(MIX)}")
    return args


def settle(gateway: Gateway, pids: dict[str, int]) -> tuple[Sample, float, bool]:
    """A sample once no dyno of the app runs and two samples a second apart agree on
    everything that must come back (a prepared sandbox being made, a dyno's dir being
    removed, are not caught half-way); or the last sample when SETTLE_TIMEOUT passes."""
    started = time.monotonic()
    previous: Sample | None = None
    while True:
        running = json.loads(gateway.cli("ps", APP, "--json"))
        current = sample(pids["manager"], pids["front"], gateway.root / "state")
        waited = time.monotonic() - started
        if not running and previous is not None and current.steady() == previous.steady():
            return current, waited, True
        if waited > SETTLE_TIMEOUT:
            return current, waited, False
        previous = current
        time.sleep(1)


def endure(args: argparse.Namespace, gateway: Gateway, work: Path) -> list[Checkpoint]:
    pids = gateway.pids()
    mix = Mix(gateway, work / "control", args.workers)
    progress = Progress("sessions", args.sessions)
    points: list[Checkpoint] = []
    deadline = time.monotonic() + args.max_minutes * 60
    began = time.monotonic()
    done = probed = 0
    last = sample(pids["manager"], pids["front"], gateway.root / "state")
    try:
        while done < args.sessions:
            if time.monotonic() > deadline:
                say(f"stopping early: --max-minutes {args.max_minutes} passed")
                break
            count = min(args.every, args.sessions - done)
            results = mix.run(done, count, progress.step)
            done += count
            elapsed = time.monotonic() - began
            settled, waited, ok = settle(gateway, pids)
            cpu = _cpu(settled) - _cpu(last)
            probe = [Result("probe", r.seconds, r.error) for r in mix.probe(args.probe)]
            probed += args.probe
            last = sample(pids["manager"], pids["front"], gateway.root / "state")
            point = checkpoint(done, elapsed, settled, waited, ok, results + probe, cpu / count)
            point.all_sessions = done + probed
            points.append(point)
            say("  " + one_line(points[-1]))
    finally:
        mix.close()
    return points


def against_fresh(
    gateway: Gateway, args: argparse.Namespace, work: Path
) -> tuple[list[float], list[float]]:
    """The probe on the long-run gateway and on a fresh one (warmed up with one
    interval of the mix, as the long run was at its baseline), one session on each in
    turn, so that both see the same load from the rest of the machine: the seconds of
    each."""
    fresh = EnduranceGateway(work / "fresh", gateway.key, {"subnet": "10.198.0.0/16"})
    long_mix = Mix(gateway, work / "control", 1)
    fresh_mix = Mix(fresh, work / "control-fresh", args.workers)
    say(f"a fresh gateway, warmed up with {args.every} sessions, then the probe on both in turn")
    try:
        fresh.start()
        fresh_mix.run(0, args.every, lambda: None)
        settle(fresh, fresh.pids())
        times: tuple[list[float], list[float]] = ([], [])
        for n in range(args.compare):
            for mix, seconds in ((long_mix, times[0]), (fresh_mix, times[1])):
                result = mix.session(-100_000 - n, "exec")
                if result.error:
                    raise RuntimeError(f"{mix.gateway.root.name}: {result.error}")
                seconds.append(result.seconds)
    finally:
        long_mix.close()
        fresh_mix.close()
        fresh.stop()
    return times


def _cpu(taken: Sample) -> float:
    return taken.manager.cpu + taken.front.cpu


def checkpoint(
    done: int,
    elapsed: float,
    settled: Sample,
    waited: float,
    ok: bool,
    results: list[Result],
    cpu_per_session: float,
) -> Checkpoint:
    seconds: dict[str, list[float]] = {"all": []}
    for result in results:
        if not result.error:
            seconds.setdefault(result.kind, []).append(result.seconds)
            if result.kind != "probe":
                seconds["all"].append(result.seconds)
    errors = [f"{r.kind}: {r.error}" for r in results if r.error]
    return Checkpoint(done, done, round(elapsed, 1), settled, round(waited, 1), ok,
                      os.getloadavg()[0], round(cpu_per_session * 1000, 2), seconds,
                      errors)  # fmt: skip


def write_results(
    points: list[Checkpoint],
    compared: tuple[list[float], list[float]],
    meta: dict[str, object],
    out: Path,
) -> str:
    out.mkdir(parents=True, exist_ok=True)
    judged = verdicts(points, compared, WAL_BOUND)
    grows = growth(points)
    (out / "endurance.json").write_text(json.dumps({
        "meta": meta,
        "verdicts": [v.__dict__ for v in judged],
        "growth": grows,
        "checkpoints": [p.to_json() for p in points],
        "end against fresh, ms": {
            name: [round(t * 1000, 2) for t in times]
            for name, times in zip(("long run", "fresh"), compared, strict=True)
        },
    }, indent=1) + "\n")  # fmt: skip
    goals = [f"- {'met' if v.met else 'MISSED'}: {v.goal} ({v.measured})" for v in judged]
    grown = [f"- {name}: {value:.1f}" for name, value in grows.items()]
    lines = [f"- {key}: {value}" for key, value in meta.items()]
    text = "\n".join([*lines, "", markdown_table(points), "", *goals, "", *grown]) + "\n"
    (out / "endurance.md").write_text(text)
    try:
        from bench.endurance_report import plot

        plot(points, out / "endurance.png")
    except ImportError:
        say("no plot: matplotlib is not installed (pip install -e '.[bench]')")
    return "\n".join([*goals, *grown])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or REPO / ("docs/benchmarks" if args.sessions >= FULL else "bench/results")
    proc.raise_fd_limit()
    work = Path(tempfile.mkdtemp(prefix="gateway-endurance-"))
    gateway = EnduranceGateway(work / "gateway", client_key(work))
    started = time.monotonic()
    meta: dict[str, object] = {}
    try:
        say(f"starting the gateway (work dir {work})")
        gateway.start()
        sandbox = next((line for line in gateway.log if "sandbox in force" in line), "?")
        meta = {
            "gateway": report.tree(REPO),
            **report.machine(),
            "sandbox": sandbox.split("sandbox in force: ", 1)[-1],
            "sessions": args.sessions,
            "every": args.every,
            "workers": args.workers,
            "mix": ", ".join(MIX),
            "load average at start": os.getloadavg()[0],
        }
        points = endure(args, gateway, work)
        compared = against_fresh(gateway, args, work) if points else ([], [])
    finally:
        gateway.stop()
        (work / "gateway.log").write_text("\n".join(gateway.log) + "\n")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    meta["load average at end"] = os.getloadavg()[0]
    meta["duration_s"] = round(time.monotonic() - started)
    summary = write_results(points, compared, meta, out)
    print(text_table(points))
    print(summary)
    say(f"results in {out} ({meta['duration_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
