"""Benchmark the gateway against OpenSSH's sshd, side by side, on this machine.

    .venv/bin/python bench/run.py            # the full run (about 10 minutes), results
                                             # and plots in docs/benchmarks/
    .venv/bin/python bench/run.py --quick    # a smoke run (under a minute), bench/results/

Starts sshd (a throwaway config on a loopback port) and `gateway serve` (the sample app)
with the sandbox it uses by default (as root: namespaces), plus one with the process
sandbox for its own rows; measures them side by side, and prints the medians, the ratio
gateway/sshd and the goal (issue 15) for each row.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `gateway` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import dynos, flood, latency, outbound, proc, release, report, throughput
from bench.rows import Row
from bench.servers import REPO, Gateway, Server, Sshd, client_key
from bench.util import MB, say

SECTIONS = ("latency", "keystrokes", "throughput", "release", "flood", "dynos", "outbound")


@dataclass(frozen=True)
class Settings:
    fresh: int = 50  # `ssh host true` runs
    execs: int = 200  # exec channels on one connection (half as many through ControlMaster)
    keystrokes: int = 500
    transfer_mb: int = 1024
    transfer_reps: int = 3
    levels: list[int] = field(default_factory=lambda: [100, 1000])  # dynos running
    new_sessions: int = 40  # fresh sessions timed at each level
    release_sizes_mb: list[int] = field(default_factory=lambda: [1, 100, 500])
    release_reps: int = 3  # new releases per size
    outbound_mb: int = 1024
    outbound_reps: int = 3


QUICK = Settings(
    fresh=5,
    execs=20,
    keystrokes=50,
    transfer_mb=64,
    transfer_reps=1,
    levels=[10],
    new_sessions=4,
    release_sizes_mb=[1, 4],
    release_reps=1,
    outbound_mb=16,
    outbound_reps=1,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fast smoke run, small sizes")
    parser.add_argument("--only", action="append", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--out", type=Path, help="where results go (default by mode)")
    parser.add_argument("--transfer-mb", type=int, help="bytes per transfer, in MB")
    parser.add_argument("--levels", help="sessions held, comma-separated (e.g. 100,500,1000)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, state)")
    parser.add_argument(
        "--replot", type=Path, metavar="DIR", help="redraw DIR's table and plots from its JSON"
    )
    parser.add_argument(
        "--gateway-tree", type=Path, help="run the gateway package from this checkout instead"
    )
    return parser.parse_args(argv)


def settings_for(args: argparse.Namespace) -> Settings:
    settings = QUICK if args.quick else Settings()
    if args.transfer_mb:
        settings = replace(settings, transfer_mb=args.transfer_mb)
    if args.levels:
        settings = replace(settings, levels=[int(n) for n in args.levels.split(",")])
    return settings


def measure(
    sections: tuple[str, ...],
    settings: Settings,
    sshd: Sshd,
    gateway: Gateway,
    process: Gateway,
    work: Path,
    meta: dict[str, object],
) -> list[Row]:
    servers: list[Server] = [sshd, gateway]
    rows: list[Row] = []
    loads = meta.setdefault("load average per section", {})
    assert isinstance(loads, dict)

    def section(name: str, title: str) -> bool:
        if name in sections:
            say(title)
            loads[name] = round(os.getloadavg()[0], 2)
        return name in sections

    if section("latency", "session latency"):
        rows += latency.session_rows([sshd, gateway, process], settings.fresh, settings.execs)
    if section("keystrokes", "keystroke echo"):
        rows += latency.keystroke_rows(servers, settings.keystrokes)
    if section("throughput", "throughput"):
        rows += throughput.rows(servers, settings.transfer_mb * MB, settings.transfer_reps)
    if section("release", "the first dyno of a new release, against its size"):
        rows += release.rows(
            sshd, [gateway, process], settings.release_sizes_mb, settings.release_reps, work
        )
    if section("flood", "session start under a log flood"):
        rows += flood.rows(gateway, settings.fresh)
    if section("outbound", "outbound throughput to a test host"):
        rows += outbound.rows(servers, settings.outbound_mb * MB, settings.outbound_reps)
    if section("dynos", "dynos running at once (both servers restarted, for a clean baseline)"):
        process.stop()  # its dynos are not measured here: no CPU for it
        for server in servers:
            server.stop()
            server.start()
        rows += dynos.rows(sshd, gateway, settings.levels, settings.new_sessions)
    return rows


def write_results(rows: list[Row], meta: dict[str, object], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({"meta": meta, "rows": [row.to_json() for row in rows]}, indent=1) + "\n"
    )
    lines = [f"- {key}: {value}" for key, value in meta.items() if key != "settings"]
    (out / "results.md").write_text("\n".join(lines) + "\n\n" + report.markdown_table(rows) + "\n")
    sections: dict[str, list[Row]] = {}
    for row in rows:
        sections.setdefault(row.section, []).append(row)
    try:
        import matplotlib  # noqa: F401 - only to know whether plots can be drawn
    except ImportError:
        say("no plots: matplotlib is not installed (pip install -e '.[bench]')")
        return
    for section, group in sections.items():
        report.plot(section, group, out / f"{report.slug(section)}.png")


def replot(out: Path) -> None:
    """Rewrite results.md and the plots of an earlier run from its results.json."""
    data = json.loads((out / "results.json").read_text())
    rows = [
        Row(**{k: v for k, v in row.items() if k not in ("ratio", "met")}) for row in data["rows"]
    ]
    write_results(rows, data["meta"], out)
    print(report.text_table(rows))


def _sandbox_line(gateway: Gateway) -> str:
    """What `gateway serve` said of its sandbox, so a run shows what it measured."""
    line = next((line for line in gateway.log if "sandbox in force" in line), "?")
    return line.split("sandbox in force: ", 1)[-1]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        replot(args.replot)
        return 0
    settings = settings_for(args)
    sections = tuple(args.only or SECTIONS)
    out = args.out or (REPO / "bench" / "results" if args.quick else REPO / "docs" / "benchmarks")
    proc.raise_fd_limit()
    work = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    key = client_key(work)
    sshd = Sshd(work / "sshd", key)
    gateway = Gateway(work / "gateway", key, tree=args.gateway_tree)
    process = Gateway(work / "gateway-process", key, tree=args.gateway_tree, sandbox="process")
    started = time.monotonic()
    try:
        say(f"starting sshd and the gateways (work dir {work})")
        for server in (sshd, gateway, process):
            server.start()
        meta: dict[str, object] = {
            "mode": "quick" if args.quick else "full",
            "gateway": report.tree(args.gateway_tree or REPO),
            **report.machine(),
            "load average at start": os.getloadavg()[0],
            "sshd negotiated": report.negotiated(sshd.ssh_argv("true")),
            "gateway negotiated": report.negotiated(gateway.ssh_argv("true")),
            "gateway sandbox": _sandbox_line(gateway),
            "settings": asdict(settings),
        }
        rows = measure(sections, settings, sshd, gateway, process, work, meta)
    finally:
        for server in (sshd, gateway, process):
            server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    meta["load average at end"] = os.getloadavg()[0]
    meta["duration_s"] = round(time.monotonic() - started)
    write_results(rows, meta, out)
    print(report.text_table(rows))
    say(f"results in {out} ({meta['duration_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
