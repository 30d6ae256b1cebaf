"""bench/endurance.py, briefly: it runs its whole mix through real OpenSSH clients and
reports every checkpoint, with nothing left behind between them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(240)
def test_a_short_endurance_run_reports_every_checkpoint(tmp_path: Path) -> None:
    argv = [sys.executable, str(REPO / "bench" / "endurance.py"), "--sessions", "40",
            "--every", "20", "--probe", "5", "--compare", "5", "--out", str(tmp_path)]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=230)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "endurance.json").read_text())
    points = report["checkpoints"]
    assert [p["sessions"] for p in points] == [20, 40]
    assert [p["all_sessions"] for p in points] == [25, 50]
    assert all(p["errors"] == [] and p["settled"] for p in points)
    kinds = set(points[-1]["latency_ms"])
    assert {"exec", "exec fresh", "pty", "detached", "dropped", "dropped fresh", "stdin",
            "probe"} <= kinds  # fmt: skip
    verdicts = {v["goal"].split(" ")[0]: v["met"] for v in report["verdicts"]}
    assert verdicts["fds,"] and verdicts["every"], report["verdicts"]
    assert report["growth"]["dyno rows per session"] == 1.0
    compared = report["end against fresh, ms"]
    assert len(compared["long run"]) == len(compared["fresh"]) == 5
    assert (tmp_path / "endurance.png").stat().st_size > 0
    assert "| sessions |" in (tmp_path / "endurance.md").read_text()
