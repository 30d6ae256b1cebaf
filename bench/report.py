"""The results: a table on stdout, a Markdown table, a JSON file and one PNG per section."""

from __future__ import annotations

import math
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

from bench.rows import Row

HEADER = ("row", "unit", "sshd", "gateway", "ratio", "goal")


def _number(value: float) -> str:
    if math.isnan(value):
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def _goal(row: Row) -> str:
    if row.note:
        return row.note
    if not row.goal:
        return ""
    subject = "ratio" if row.goal_value is None else f"{_number(row.goal_value)} {row.unit}"
    verdict = {True: "met", False: "MISSED", None: "?"}[row.met]
    return f"{subject} {row.goal}: {verdict}"


def cells(row: Row) -> tuple[str, ...]:
    ratio = "-" if math.isnan(row.ratio) else f"{row.ratio:.2f}x"
    return (
        f"{row.section}: {row.label}",
        row.unit,
        _number(row.sshd),
        _number(row.gateway),
        ratio,
        _goal(row),
    )


def text_table(rows: list[Row]) -> str:
    lines = [HEADER, *(cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    out = []
    for n, line in enumerate(lines):
        out.append(
            "  ".join(
                cell.ljust(w) if i in (0, 1, 5) else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(line, widths, strict=True))
            ).rstrip()
        )
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def markdown_table(rows: list[Row]) -> str:
    out = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += ["| " + " | ".join(cells(row)) + " |" for row in rows]
    return "\n".join(out)


def _run(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (result.stdout + result.stderr).strip().splitlines()[0] if result else "?"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import asyncssh

    cpu = "?"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as info:
        mem_kb = int(info.readline().split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gb": round(mem_kb / 1024**2, 1),
        "kernel": platform.release(),
        "os": _run(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "openssh": _run(["ssh", "-V"]),
        "asyncssh": asyncssh.__version__,
        "python": platform.python_version(),
    }


def tree(path: Path) -> str:
    """Which gateway code ran: the checkout's commit, and whether gateway/ had changes."""
    commit = _run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"])
    if commit == "?" or "fatal" in commit:
        return str(path)
    status = subprocess.run(
        ["git", "-C", str(path), "status", "--porcelain", "--", "gateway"],
        capture_output=True,
        text=True,
    ).stdout
    return f"{path} at {commit}" + (" with uncommitted changes in gateway/" if status else "")


def negotiated(argv: list[str]) -> str:
    """The key exchange and cipher an `ssh -v` run agreed on."""
    result = subprocess.run([argv[0], "-v", *argv[1:]], capture_output=True, text=True)
    kex = re.search(r"kex: algorithm: (\S+)", result.stderr)
    cipher = re.search(r"kex: server->client cipher: (\S+)", result.stderr)
    return f"kex {kex[1] if kex else '?'}, cipher {cipher[1] if cipher else '?'}"


# -- plots ----------------------------------------------------------------------------

COLORS = {"sshd": "#777777", "gateway": "#1f77b4"}


def plot(section: str, rows: list[Row], path: Path) -> None:
    """One small PNG: lines against x where the rows have one, bars otherwise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[Row]] = {}
    for row in rows:
        kind = row.label.split(",")[0] if row.x is not None else section
        groups.setdefault(kind, []).append(row)
    widths = [max(4.2, 0.9 * len(g)) if g[0].x is None else 4.2 for g in groups.values()]
    fig, axes = plt.subplots(
        1, len(groups), figsize=(sum(widths), 3), squeeze=False, width_ratios=widths
    )
    for ax, (kind, group) in zip(axes[0], groups.items(), strict=True):
        if group[0].x is not None:
            xs = [row.x for row in group]
            for name in ("sshd", "gateway"):
                values = [getattr(row, name) for row in group]
                ax.plot(xs, values, "o-", color=COLORS[name], label=name)
            ax.set_xlabel("release MB" if section == "new release" else "dynos running", fontsize=8)
        else:
            # "down, aes128-gcm" -> "down\naes128-gcm"; "(...)" details stay in the table.
            labels = [
                row.label.split(" (")[0].replace(", ", "\n", 1).replace("-poly1305", "")
                for row in group
            ]
            positions = range(len(group))
            for offset, name in ((-0.2, "sshd"), (0.2, "gateway")):
                values = [getattr(row, name) for row in group]
                bars = ax.bar(
                    [p + offset for p in positions],
                    [0 if math.isnan(v) else v for v in values],
                    width=0.4,
                    color=COLORS[name],
                    label=name,
                )
                for bar, value in zip(bars, values, strict=True):
                    if math.isnan(value):
                        ax.annotate("n/a", (bar.get_x(), 0), fontsize=6, va="bottom")
            ax.set_xticks(list(positions), labels, fontsize=7)
        ax.set_title(kind if len(groups) > 1 else section, fontsize=9)
        ax.set_ylabel(group[0].unit, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def slug(section: str) -> str:
    return section.replace(" ", "_")
