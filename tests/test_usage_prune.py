"""`gateway usage:prune`: usage records older than N days exported, then deleted; bad
input and an export that cannot be written delete nothing. On SQLite and PostgreSQL."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.config import parse
from gateway.core.dyno import State
from gateway.store import Store, open_store
from tests.postgres import PostgresServer


@dataclass
class Setup:
    """A state (SQLite in a state dir, or a PostgreSQL database), the config file the
    CLI reads, and a store open on it."""

    config: Path
    store: Store

    def cli(self, *args: str, **options: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", "--config", str(self.config), *args],
            capture_output=True, text=True, timeout=60, **options,  # type: ignore[call-overload]
        )  # fmt: skip

    def ended(self, app: str, count: int) -> list[str]:
        """`count` dynos of `app` that ran and ended; their names."""
        names = []
        for _ in range(count):
            dyno = self.store.create_dyno(app, "rake work", "standard-1x", 1, False)
            self.store.end_dyno(app, dyno.name, State.COMPLETE, 0, None)
            names.append(dyno.name)
        return names

    def names(self, app: str) -> list[str]:
        return [dyno.name for dyno in self.store.list_dynos(app)]


@pytest.fixture(params=["sqlite", "postgresql"])
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Setup]:
    data = {"state_dir": str(tmp_path / "state")}
    text = f'state_dir = "{tmp_path / "state"}"\n'
    if request.param == "postgresql":
        server: PostgresServer = request.getfixturevalue("postgres")
        data["database_url"] = url = server.create_database()
        text += f'database_url = "{url}"\n'
    config = tmp_path / "gateway.toml"
    config.write_text(text)
    store = open_store(parse(data))
    store.create_app("shop")
    yield Setup(config, store)
    store.close()


def test_pages_of_what_ended_before_a_time_and_deleting_them(setup: Setup) -> None:
    store = setup.store
    early = setup.ended("shop", 3)
    cutoff = time.time()
    time.sleep(0.01)
    setup.ended("shop", 1)
    running = store.create_dyno("shop", "bash", "standard-1x", 1, True)
    first = store.ended_before(cutoff, limit=2)
    second = store.ended_before(cutoff, after_id=first[-1][0], limit=2)
    assert [record.name for _, record in first + second] == early
    assert store.ended_before(cutoff, after_id=second[-1][0]) == []
    everything = [row_id for row_id, _ in store.ended_before(time.time() + 60)]
    assert len(everything) == 4  # the running dyno is not among them
    # Asked to delete every row, the store keeps the running dyno's.
    all_ids = [*everything, max(everything) + 1]
    assert store.delete_ended(all_ids) == 4
    assert setup.names("shop") == [running.name]


def test_prune_exports_then_deletes_what_ended_before_the_cutoff(
    setup: Setup, tmp_path: Path
) -> None:
    store = setup.store
    store.create_app("blog")
    setup.ended("shop", 3)
    setup.ended("blog", 1)
    running = store.create_dyno("shop", "bash", "standard-1x", 1, True)
    export = tmp_path / "usage.jsonl"

    kept = setup.cli("usage:prune", "--before", "30", "--export", str(export))
    assert kept.returncode == 0, kept.stderr
    assert kept.stdout.startswith("Pruned the usage records of 0 dynos that ended before ")
    assert export.read_text() == ""
    assert len(store.usage()) == 2

    pruned = setup.cli("usage:prune", "--before", "0", "--export", str(export))
    assert pruned.returncode == 0, pruned.stderr
    assert "Pruned the usage records of 4 dynos that ended before" in pruned.stdout
    assert pruned.stdout.rstrip().endswith(f"; exported to {export}")
    lines = [json.loads(line) for line in export.read_text().splitlines()]
    assert [(line["app"], line["dyno"]) for line in lines] == [
        ("shop", "run.1"), ("shop", "run.2"), ("shop", "run.3"), ("blog", "run.1"),
    ]  # fmt: skip
    assert lines[0]["size"] == "standard-1x" and lines[0]["command"] == "rake work"
    assert 0 <= lines[0]["seconds"] < 5 and lines[0]["ended_at"].endswith("Z")
    assert (lines[0]["state"], lines[0]["exit_status"], lines[0]["release"]) == ("complete", 0, 1)
    assert export.stat().st_mode & 0o777 == 0o600
    assert store.usage() == []
    assert setup.names("shop") == [running.name]  # a running dyno is never pruned
    # run.N is never reused, pruned or not.
    assert store.create_dyno("shop", "bash", "standard-1x", 1, True).name == "run.5"

    # Later: what ended since is appended to the same export; nothing is exported twice.
    store.end_dyno("shop", running.name, State.COMPLETE, 0, None)
    again = setup.cli("usage:prune", "--before", "0", "--export", str(export))
    assert "of 1 dynos" in again.stdout, again.stderr
    assert [json.loads(line)["dyno"] for line in export.read_text().splitlines()][4:] == ["run.4"]

    # Without --export the records just go.
    setup.ended("blog", 1)
    assert "of 1 dynos" in setup.cli("usage:prune", "--before", "0").stdout
    assert setup.names("blog") == []
    audit = (tmp_path / "state" / "audit.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in audit if '"usage_pruned"' in line]
    assert [event["dynos"] for event in events] == [0, 4, 1, 1]
    assert events[1]["export"] == str(export) and "export" not in events[3]


@pytest.mark.parametrize("days", ["-1", "abc", "1.5", "", "36501", "99999999999999999999"])
def test_bad_days_are_refused_and_nothing_is_pruned(setup: Setup, days: str) -> None:
    setup.ended("shop", 2)
    refused = setup.cli("usage:prune", "--before", days)
    assert refused.returncode == 1
    assert refused.stderr == (
        f"gateway: --before takes a whole number of days from 0 to 36500 "
        f"(usage:prune --before 90), not {days!r}; nothing was pruned\n"
    )
    assert setup.names("shop") == ["run.1", "run.2"]


def test_an_export_that_cannot_be_written_prunes_nothing(setup: Setup, tmp_path: Path) -> None:
    setup.ended("shop", 2)
    for target, reason in (
        (tmp_path / "missing" / "usage.jsonl", "No such file or directory"),
        (tmp_path, "Is a directory"),
        (Path("/dev/full"), "No space left on device"),  # opens, then every write fails
    ):
        refused = setup.cli("usage:prune", "--before", "0", "--export", str(target))
        assert refused.returncode == 1
        assert refused.stderr == f"gateway: cannot write {target}: {reason}; nothing was pruned\n"
        assert setup.names("shop") == ["run.1", "run.2"]


def test_an_archive_the_export_fails_to_grow_is_left_as_it_was(
    setup: Setup, tmp_path: Path
) -> None:
    """A write that fails half-way (here the file size limit, as a full disk would) cuts
    the archive back to what it held: no partial line, no record exported twice."""
    setup.ended("shop", 600)  # more than one page
    archive = tmp_path / "usage.jsonl"
    held = b'{"earlier": "export"}\n' * 400_000  # ~9 MB: the state's files stay smaller
    archive.write_bytes(held)
    limit = len(held) + 1000  # room for a few lines, not for 600

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    refused = setup.cli(
        "usage:prune", "--before", "0", "--export", str(archive), preexec_fn=limited
    )
    assert refused.returncode == 1, refused.stdout
    assert (
        refused.stderr == f"gateway: cannot write {archive}: File too large; nothing was pruned\n"
    )
    assert archive.read_bytes() == held
    assert len(setup.names("shop")) == 600
