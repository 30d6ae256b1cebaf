"""The endurance run's checkpoints as a table, its goals with their verdicts, and a plot."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.endurance_sample import Sample
from bench.util import MB, median, percentile

RSS_SLACK = 5 * MB  # the most either process's RSS may grow after warm-up
LATENCY_SLACK = 0.10  # the end's median session latency within 10% of the start's
LATENCY_KIND = "probe"  # compared: `echo` through a master, one at a time, on an idle gateway
MIX_KIND = "exec"  # shown: the same within the mix (four clients at once)
WINDOW = 3  # intervals pooled at the start (after the warm-up) and at the end


@dataclass
class Checkpoint:
    sessions: int  # run so far in the mix
    all_sessions: int  # and with the probes
    elapsed: float  # seconds since the first session
    sample: Sample  # once the gateway settled: no dyno running
    settle_seconds: float
    settled: bool  # False: the timeout passed first (the sample is what it was then)
    load: float  # 1-minute load average
    # CPU time of the manager and the front per session of the interval, in ms: what a
    # session costs the gateway, much less moved by other programs' load than latency.
    cpu_ms: float
    # The interval's sessions: seconds per kind ("all" for every kind), and failures.
    seconds: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def latency(self, kind: str = LATENCY_KIND) -> tuple[float, float]:
        """Median and p99 of the interval's sessions of `kind`, in ms."""
        values = self.seconds.get(kind, [])
        return median(values) * 1000, percentile(values, 99) * 1000

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k not in ("sample", "seconds")}
        data["sample"] = _sample_json(self.sample)
        data["latency_ms"] = {
            kind: {"median": round(p50, 2), "p99": round(p99, 2), "count": len(values)}
            for kind, values in self.seconds.items()
            for p50, p99 in [self.latency(kind)]
        }
        return data


def _sample_json(sample: Sample) -> dict[str, Any]:
    data = dict(sample.__dict__)
    for part in ("manager", "front"):
        use = getattr(sample, part)
        data[part] = {**use.__dict__, "children": list(use.children)}
    return data


COLUMNS = (
    "sessions", "mgr fds", "front fds", "mgr RSS MB", "front RSS MB", "threads m/f",
    "procs", "dyno dirs", "mounts", "cgroups", "db KB", "WAL KB", "audit KB",
    "mix p50 ms", "mix p99 ms", "probe p50 ms", "probe p99 ms", "CPU ms", "errors", "load",
)  # fmt: skip


def cells(point: Checkpoint) -> tuple[str, ...]:
    s = point.sample
    p50, p99 = point.latency(MIX_KIND)
    probe50, probe99 = point.latency()
    return (
        f"{point.sessions}" + ("" if point.settled else " (unsettled)"),
        str(s.manager.fds),
        str(s.front.fds),
        f"{s.manager.rss / MB:.1f}",
        f"{s.front.rss / MB:.1f}",
        f"{s.manager.threads}/{s.front.threads}",
        str(s.processes),
        str(s.dyno_dirs),
        str(s.mounts),
        str(s.cgroups),
        f"{s.db_bytes / 1024:.0f}",
        f"{s.wal_bytes / 1024:.0f}",
        f"{s.audit_bytes / 1024:.0f}",
        f"{p50:.0f}",
        f"{p99:.0f}",
        f"{probe50:.0f}",
        f"{probe99:.0f}",
        f"{point.cpu_ms:.1f}",
        str(len(point.errors)),
        f"{point.load:.1f}",
    )


def one_line(point: Checkpoint) -> str:
    """A checkpoint as `name=value` pairs, for the progress output."""
    return ", ".join(f"{name} {cell}" for name, cell in zip(COLUMNS, cells(point), strict=True))


def text_table(points: list[Checkpoint]) -> str:
    lines = [COLUMNS, *(cells(p) for p in points)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)) for line in lines
    )


def markdown_table(points: list[Checkpoint]) -> str:
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---:|" * len(COLUMNS)]
    out += ["| " + " | ".join(cells(p)) + " |" for p in points]
    return "\n".join(out)


@dataclass(frozen=True)
class Verdict:
    goal: str
    measured: str
    met: bool


def verdicts(
    points: list[Checkpoint], compared: tuple[list[float], list[float]], wal_bound: int
) -> list[Verdict]:
    """The issue's goals, judged from the first checkpoint (after the warm-up interval)
    to the last; latency on `compared`, the probe's seconds on the long-run gateway and
    on a fresh one, taken in turn."""
    base, end, after = points[0], points[-1], points[1:] or points[:1]
    out = []
    drifted = [p.sessions for p in after if p.sample.steady() != base.sample.steady()]
    out.append(Verdict(
        "fds, child processes, dyno dirs, mounts, cgroups back to the baseline exactly at "
        "every checkpoint",
        f"baseline at {base.sessions} sessions; differs at: {drifted or 'none'}",
        not drifted and all(p.settled for p in points),
    ))  # fmt: skip
    for part in ("manager", "front"):
        grown = max(getattr(p.sample, part).rss for p in after) - getattr(base.sample, part).rss
        out.append(Verdict(
            f"{part} RSS within {RSS_SLACK // MB} MB of the baseline",
            f"largest growth {grown / MB:+.1f} MB",
            grown <= RSS_SLACK,
        ))  # fmt: skip
    largest = max(p.sample.wal_bytes for p in points)
    resets = end.sample.wal_resets - base.sample.wal_resets
    out.append(Verdict(
        f"WAL checkpointed and bounded (at most {wal_bound // 1024} KB)",
        f"{resets} WAL resets after the baseline; largest {largest / 1024:.0f} KB",
        resets > 0 and largest <= wal_bound,
    ))  # fmt: skip
    # The probe over time, pooled over a few intervals at each end, for the record: it
    # moves with the load other programs put on the machine. The verdict is on the
    # probe taken in turn on this gateway and on a fresh one, which share that load.
    first, last = after[:WINDOW], points[-WINDOW:]
    (start_p50, _), (end_p50, _) = pooled_latency(first), pooled_latency(last)
    long_p50, fresh_p50 = median(compared[0]) * 1000, median(compared[1]) * 1000
    out.append(Verdict(
        f"session latency at the end within {LATENCY_SLACK:.0%} of the start (the probe: "
        "`echo` through a master, one at a time, in turn with a fresh gateway)",
        f"median {long_p50:.1f} ms after {end.sessions} sessions, {fresh_p50:.1f} ms fresh "
        f"({long_p50 / fresh_p50 - 1:+.0%}, {len(compared[0])} each); over time: "
        f"{start_p50:.1f} ms in the {len(first)} intervals after the warm-up (load "
        f"{_load(first)}), {end_p50:.1f} ms in the last {len(last)} (load {_load(last)})",
        long_p50 <= fresh_p50 * (1 + LATENCY_SLACK),
    ))  # fmt: skip
    start_cpu, end_cpu = _mean(p.cpu_ms for p in first), _mean(p.cpu_ms for p in last)
    out.append(Verdict(
        f"gateway CPU per session at the end within {LATENCY_SLACK:.0%} of the start",
        f"{start_cpu:.1f} ms, then {end_cpu:.1f} ms ({end_cpu / start_cpu - 1:+.0%})",
        end_cpu <= start_cpu * (1 + LATENCY_SLACK),
    ))  # fmt: skip
    errors = sum(len(p.errors) for p in points)
    out.append(Verdict("every session did what it should", f"{errors} failed", errors == 0))
    return out


def pooled_latency(points: list[Checkpoint], kind: str = LATENCY_KIND) -> tuple[float, float]:
    """Median and p99 in ms of the sessions of `kind` of all these intervals together."""
    values = [t for p in points for t in p.seconds.get(kind, [])]
    return median(values) * 1000, percentile(values, 99) * 1000


def _mean(values: Iterable[float]) -> float:
    found = list(values)
    return sum(found) / len(found) if found else math.nan


def _load(points: list[Checkpoint]) -> str:
    return "-".join(f"{p.load:.1f}" for p in points)


def growth(points: list[Checkpoint]) -> dict[str, float]:
    """What grows by design, per session after the baseline: bytes of the database file
    and the audit trail, rows of the dynos table."""
    base, end = points[0], points[-1]
    sessions = end.all_sessions - base.all_sessions
    if sessions <= 0:
        return {}
    return {
        "db bytes per session": (end.sample.db_bytes - base.sample.db_bytes) / sessions,
        "audit bytes per session": (end.sample.audit_bytes - base.sample.audit_bytes) / sessions,
        "dyno rows per session": (end.sample.dyno_rows - base.sample.dyno_rows) / sessions,
    }


def plot(points: list[Checkpoint], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p.sessions for p in points]
    panels: list[tuple[str, str, dict[str, list[float]]]] = [
        ("open descriptors", "fds", {
            "manager": [p.sample.manager.fds for p in points],
            "front": [p.sample.front.fds for p in points],
        }),
        ("resident memory", "MB", {
            "manager": [p.sample.manager.rss / MB for p in points],
            "front": [p.sample.front.rss / MB for p in points],
        }),
        ("what dynos leave", "count", {
            "processes": [p.sample.processes for p in points],
            "dyno dirs": [p.sample.dyno_dirs for p in points],
            "cgroups": [p.sample.cgroups for p in points],
            "mounts": [p.sample.mounts for p in points],
            "threads (manager)": [p.sample.manager.threads for p in points],
        }),
        ("state on disk", "MB", {
            "gateway.db": [p.sample.db_bytes / MB for p in points],
            "WAL": [p.sample.wal_bytes / MB for p in points],
            "audit.jsonl": [p.sample.audit_bytes / MB for p in points],
        }),
        ("session latency; gateway CPU per session", "ms", {
            "probe median": [p.latency()[0] for p in points],
            "probe p99": [p.latency()[1] for p in points],
            "mix exec median": [p.latency(MIX_KIND)[0] for p in points],
            "CPU per session": [p.cpu_ms for p in points],
        }),
        ("rows in the state database", "thousands", {
            "dynos (usage, by design)": [p.sample.dyno_rows / 1000 for p in points],
            "app log (bounded)": [p.sample.log_rows / 1000 for p in points],
        }),
    ]  # fmt: skip
    fig, axes = plt.subplots(2, 3, figsize=(12, 5.5))
    for ax, (title, unit, series) in zip(axes.flat, panels, strict=True):
        for label, values in series.items():
            ax.plot(xs, [math.nan if v is None else v for v in values], "o-", ms=3, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(unit, fontsize=8)
        ax.set_xlabel("sessions", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
