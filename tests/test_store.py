"""The store's behaviour, the same tests on both backends: SQLite in a state dir, and a
real PostgreSQL server (tests/postgres.py). Concurrency is real processes, each with its
own store, as the front, the manager and the admin CLI (and other nodes) have."""

from __future__ import annotations

import hashlib
import multiprocessing
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from gateway.config import parse
from gateway.core.applog import LogLine
from gateway.core.dyno import State
from gateway.store import (
    DynoLimitReached,
    SlugCorrupt,
    SQLiteStore,
    Store,
    StoreError,
    StoreUnavailable,
    open_store,
)
from gateway.store.schema import LATEST
from tests.postgres import PostgresServer


@dataclass(frozen=True)
class Where:
    """Where a test's state lives; picklable, so other processes can open it too."""

    state_dir: str
    database_url: str = ""

    def open(self, node: str | None = None) -> Store:
        data = {"state_dir": self.state_dir, "database_url": self.database_url}
        return open_store(parse(data), node=node)


@pytest.fixture(params=["sqlite", "postgresql"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Where:
    if request.param == "sqlite":
        return Where(str(tmp_path / "state"))
    server: PostgresServer = request.getfixturevalue("postgres")
    return Where(str(tmp_path / "state"), server.create_database())


@pytest.fixture
def store(where: Where) -> Iterator[Store]:
    opened = where.open()
    yield opened
    opened.close()


def _slug(path: Path, size: int, seed: int = 0) -> tuple[Path, str]:
    """A file of `size` bytes (incompressible, like a real .tgz) and its SHA-256."""
    data = b"".join(hashlib.sha256(f"{seed}.{i}".encode()).digest() for i in range(size // 32 + 1))[
        :size
    ]
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def _shop_on(server: PostgresServer, tmp_path: Path) -> tuple[Where, Store]:
    """A new database on `server` with the app `shop`, and a store open on it."""
    where = Where(str(tmp_path / "state"), server.create_database())
    store = where.open()
    store.create_app("shop")
    return where, store


# -- schema --------------------------------------------------------------------------


def test_an_empty_database_migrates_to_the_latest_schema(where: Where) -> None:
    store = where.open()
    assert store.schema_version == LATEST
    assert store.migrate() == LATEST  # again: nothing to do
    assert store.list_apps() == []


def test_an_old_sqlite_state_dir_upgrades_in_place(tmp_path: Path) -> None:
    """A gateway.db at schema v4, as the gateway made them before this backend split."""
    state = tmp_path / "state"
    state.mkdir()
    db = sqlite3.connect(state / "gateway.db")
    db.executescript(V4_SCHEMA)
    db.executescript(
        "INSERT INTO apps (id, name, size, run_counter, created_at)"
        " VALUES (1, 'shop', 'standard-2x', 7, 1.0);"
        "INSERT INTO releases (app_id, version, slug_sha256, slug_size, unpacked_size,"
        " procfile, created_at) VALUES (1, 3, 'abc', 10, 20, '{\"web\": \"x\"}', 2.0);"
        "INSERT INTO dynos (app_id, name, command, size, release_version, attached, state,"
        " created_at, updated_at, pid, pid_started) VALUES"
        " (1, 'run.7', 'bash', 'standard-2x', 3, 1, 'up', 5.0, 5.0, 4242, 99);"
        "INSERT INTO config_vars VALUES (1, 'KEY', 'value');"
        "PRAGMA user_version=4;"
    )
    db.close()
    store = Where(str(state)).open(node="here")
    assert store.schema_version == LATEST
    assert store.app("shop").size == "standard-2x"
    assert store.get_config("shop") == {"KEY": "value"}
    assert store.latest_release("shop").procfile == {"web": "x"}  # type: ignore[union-attr]
    [old] = store.list_dynos(running=True)
    assert (old.name, old.pid, old.pid_started, old.node) == ("run.7", 4242, 99, "")
    new = store.create_dyno("shop", "bash", "standard-1x", 3, True)
    assert (new.name, new.node) == ("run.8", "here")  # the counter carried over


# -- apps, config vars, keys, tokens --------------------------------------------------


def test_apps(store: Store) -> None:
    for name in ("ab", "a-b", "a1"):
        store.create_app(name)
    with pytest.raises(StoreError, match="app 'ab' already exists"):
        store.create_app("ab")
    assert [a.name for a in store.list_apps()] == ["a-b", "a1", "ab"]  # byte order, both
    assert store.get_app("nope") is None
    with pytest.raises(StoreError, match="no such app: 'nope'"):
        store.app("nope")
    store.set_app_size("ab", "performance-m")
    assert store.app("ab").size == "performance-m"
    assert store.app("a1").size == "standard-1x"


def test_each_app_gets_its_own_uid_once_and_none_is_granted_twice(store: Store) -> None:
    for name in ("a", "b", "c"):
        store.create_app(name)
    first = store.app_uid("a", 100000, 100001)
    assert first == 100000 and store.app_uid("a", 100000, 100001) == 100000  # kept
    assert store.app_uid("b", 100000, 100001) == 100001
    with pytest.raises(StoreError, match="uid range 100000-100001 is used up"):
        store.app_uid("c", 100000, 100001)
    # A wider range later: the next after every uid ever granted, never a gap's.
    assert store.app_uid("c", 99000, 200000) == 100002


def test_an_apps_largest_size(store: Store) -> None:
    store.create_app("shop")
    assert store.app("shop").max_size is None
    store.set_app_size("shop", None, "performance-m")
    assert (store.app("shop").size, store.app("shop").max_size) == ("standard-1x", "performance-m")
    store.set_app_size("shop", "standard-2x", "")
    assert (store.app("shop").size, store.app("shop").max_size) == ("standard-2x", None)


def test_config_vars(store: Store) -> None:
    store.create_app("shop")
    store.set_config("shop", {"AB": "1", "A_B": "2", "Z": "3"})
    store.set_config("shop", {"Z": "new"})
    store.unset_config("shop", ["AB", "MISSING"])
    assert store.get_config("shop") == {"A_B": "2", "Z": "new"}
    assert list(store.get_config("shop")) == ["A_B", "Z"]
    with pytest.raises(StoreError):
        store.set_config("nope", {"A": "1"})


def test_keys(store: Store) -> None:
    store.create_app("shop")
    store.create_app("blog")
    assert store.add_key("shop", "SHA256:aa", "ssh-ed25519 AAAA1", "me")
    assert not store.add_key("shop", "SHA256:aa", "ssh-ed25519 AAAA1", "me")
    assert store.add_key("shop", "SHA256:bb", "ssh-ed25519 AAAA2", "")
    assert [(k.fingerprint, k.comment) for k in store.list_keys("shop")] == [
        ("SHA256:aa", "me"),
        ("SHA256:bb", ""),
    ]
    assert store.has_key("shop", "SHA256:aa")
    assert not store.has_key("blog", "SHA256:aa")
    assert not store.has_key("nope", "SHA256:aa")
    assert store.remove_key("shop", "SHA256:aa")
    assert not store.remove_key("shop", "SHA256:aa")
    assert not store.has_key("shop", "SHA256:aa")


def test_tokens(store: Store) -> None:
    store.create_app("shop")
    store.create_app("blog")
    store.add_token("secret-1", ["shop", "blog"])
    assert store.token_apps("secret-1") == ["blog", "shop"]
    assert store.token_apps("secret-2") is None
    with pytest.raises(StoreError, match="no such app"):
        store.add_token("secret-3", ["nope"])
    assert store.token_apps("secret-3") is None


# -- releases and slugs ---------------------------------------------------------------


def test_releases_and_their_slugs_round_trip(store: Store, tmp_path: Path) -> None:
    store.create_app("shop")
    big, big_sha = _slug(tmp_path / "big.tgz", 2 * 1024**2 + 12345)  # three chunks
    small, small_sha = _slug(tmp_path / "small.tgz", 10, seed=1)
    placed: list[int] = []
    one = store.add_release("shop", big_sha, big.stat().st_size, 99, {"web": "w"}, slug=big)
    two = store.add_release(
        "shop", small_sha, 10, 5, {}, place=placed.append, slug=small
    )  # fmt: skip
    three = store.add_release("shop", big_sha, big.stat().st_size, 99, {}, slug=big)
    assert (one.version, two.version, three.version, placed) == (1, 2, 3, [2])
    assert [r.version for r in store.list_releases("shop")] == [1, 2, 3]
    assert store.latest_release("shop") == three
    assert store.get_release("shop", 2) == two
    assert store.get_release("shop", 9) is None
    for release, source in ((one, big), (two, small), (three, big)):
        out = tmp_path / f"out-v{release.version}.tgz"
        assert store.write_slug("shop", release.version, out) == release
        assert out.read_bytes() == source.read_bytes()
    with pytest.raises(StoreError, match="no release v9"):
        store.write_slug("shop", 9, tmp_path / "nine.tgz")
    assert not (tmp_path / "nine.tgz").exists()


def test_a_slug_that_is_not_what_was_checked_is_refused(store: Store, tmp_path: Path) -> None:
    store.create_app("shop")
    slug, sha = _slug(tmp_path / "a.tgz", 5000)
    with pytest.raises(SlugCorrupt, match="changed since it was checked"):
        store.add_release("shop", "0" * 64, 5000, 1, {}, slug=slug)
    with pytest.raises(SlugCorrupt):
        store.add_release("shop", sha, 4999, 1, {}, slug=slug)
    assert store.list_releases("shop") == []
    # Nothing half-kept: the next release is v1, and its slug reads back whole.
    assert store.add_release("shop", sha, 5000, 1, {}, slug=slug).version == 1
    store.write_slug("shop", 1, tmp_path / "out.tgz")
    assert (tmp_path / "out.tgz").read_bytes() == slug.read_bytes()
    if isinstance(store, SQLiteStore):
        assert sorted(p.name for p in (store.slugs_dir / "shop").iterdir()) == ["v1.tgz"]


def test_place_failing_records_no_release(store: Store, tmp_path: Path) -> None:
    store.create_app("shop")
    slug, sha = _slug(tmp_path / "a.tgz", 100)

    def place(version: int) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.add_release("shop", sha, 100, 1, {}, place=place, slug=slug)
    assert store.list_releases("shop") == []
    if isinstance(store, SQLiteStore):
        assert list((store.slugs_dir / "shop").iterdir()) == []


def test_a_damaged_stored_slug_is_caught_on_the_way_out(
    store: Store, where: Where, tmp_path: Path
) -> None:
    store.create_app("shop")
    slug, sha = _slug(tmp_path / "a.tgz", 1024**2 + 10)
    store.add_release("shop", sha, slug.stat().st_size, 1, {}, slug=slug)
    if isinstance(store, SQLiteStore):
        kept = store.slugs_dir / "shop" / "v1.tgz"
        kept.write_bytes(kept.read_bytes()[:-1] + b"!")
    else:
        with psycopg.connect(where.database_url, autocommit=True) as conn:
            conn.execute("UPDATE slug_chunks SET data = 'x'::bytea WHERE seq = 1")
    out = tmp_path / "out.tgz"
    with pytest.raises(SlugCorrupt, match="fails its digest check"):
        store.write_slug("shop", 1, out)
    assert list(tmp_path.glob("*out.tgz*")) == []


def test_a_release_recorded_without_its_slug_says_so(store: Store, tmp_path: Path) -> None:
    store.create_app("shop")
    store.add_release("shop", "ab" * 32, 10, 1, {})
    with pytest.raises(StoreError, match="slug of shop v1"):
        store.write_slug("shop", 1, tmp_path / "out.tgz")


def test_postgresql_keeps_one_copy_of_a_slug_in_1mib_chunks(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    where, store = _shop_on(postgres, tmp_path)
    slug, sha = _slug(tmp_path / "a.tgz", 3 * 1024**2 + 1)
    for _ in range(3):
        store.add_release("shop", sha, slug.stat().st_size, 1, {}, slug=slug)
    with psycopg.connect(where.database_url) as conn:
        sizes = conn.execute("SELECT length(data) FROM slug_chunks ORDER BY seq").fetchall()
        assert [size for (size,) in sizes] == [1024**2] * 3 + [1]
        assert conn.execute("SELECT count(*) FROM slugs").fetchone() == (1,)
    assert not (tmp_path / "state" / "slugs").exists()  # nothing on this node's disk


# -- dynos ---------------------------------------------------------------------------


def test_dynos(where: Where) -> None:
    store = where.open(node="node-a")
    other = where.open(node="node-b")
    store.create_app("shop")
    store.create_app("blog")
    one = store.create_dyno("shop", "bash", "standard-1x", 1, True)
    two = other.create_dyno("shop", "rake db:migrate", "standard-2x", 1, False)
    blog = store.create_dyno("blog", "bash", "standard-1x", 1, True)
    assert (one.name, two.name, blog.name) == ("run.1", "run.2", "run.1")
    assert (one.state, one.attached, one.node, one.ended_at) == ("starting", True, "node-a", None)
    assert (two.attached, two.node, two.size) == (False, "node-b", "standard-2x")
    assert where.open().node == socket.gethostname()  # the default
    store.set_dyno_process("shop", "run.1", 4242, 123456789012)
    store.set_dyno_state("shop", "run.1", State.UP)
    got = store.get_dyno("shop", "run.1")
    assert got is not None
    assert (got.pid, got.pid_started, got.state) == (4242, 123456789012, "up")
    store.end_dyno("shop", "run.1", State.COMPLETE, 3, None)
    other.end_dyno("shop", "run.2", State.CRASHED, None, "KILL")
    ended = store.get_dyno("shop", "run.2")
    assert ended is not None and (ended.state, ended.exit_signal) == ("crashed", "KILL")
    assert ended.ended_at is not None
    assert [d.name for d in store.list_dynos("shop")] == ["run.1", "run.2"]
    assert [(d.app, d.name) for d in store.list_dynos(running=True)] == [("blog", "run.1")]
    assert [d.app for d in store.list_dynos(node="node-b")] == ["shop"]
    assert store.list_dynos("blog", running=True, node="node-b") == []
    assert store.get_dyno("shop", "run.9") is None
    # run.N is never reused, even after every dyno ended.
    assert store.create_dyno("shop", "bash", "standard-1x", 1, True).name == "run.3"


def test_the_per_app_limit(store: Store) -> None:
    store.create_app("shop")
    store.create_app("blog")
    for _ in range(2):
        store.create_dyno("shop", "bash", "standard-1x", 1, True, max_running=2)
    with pytest.raises(DynoLimitReached) as refused:
        store.create_dyno("shop", "bash", "standard-1x", 1, True, max_running=2)
    assert (refused.value.running, refused.value.limit) == (2, 2)
    assert "shop already runs 2 one-off dynos" in str(refused.value)
    assert store.create_dyno("blog", "bash", "standard-1x", 1, True, max_running=2)
    store.end_dyno("shop", "run.1", State.COMPLETE, 0, None)
    # The refused attempt used no number up.
    assert store.create_dyno("shop", "x", "standard-1x", 1, True, max_running=2).name == "run.3"


def test_usage(store: Store) -> None:
    store.create_app("shop")
    store.create_app("blog")
    for app, size in (("shop", "standard-1x"), ("shop", "standard-1x"), ("blog", "standard-2x")):
        dyno = store.create_dyno(app, "bash", size, 1, True)
        store.end_dyno(app, dyno.name, State.COMPLETE, 0, None)
    store.create_dyno("shop", "bash", "standard-1x", 1, True)  # still running: not counted
    rows = store.usage()
    assert [(r.app, r.size, r.dynos) for r in rows] == [
        ("blog", "standard-2x", 1),
        ("shop", "standard-1x", 2),
    ]
    assert all(0 <= r.seconds < 5 for r in rows)
    assert [r.app for r in store.usage("shop")] == ["shop"]
    assert store.usage(since=time.time() + 60) == []
    with pytest.raises(StoreError):
        store.usage("nope")


# -- the app log ---------------------------------------------------------------------


def test_the_app_log_keeps_the_newest_lines(store: Store) -> None:
    store.create_app("shop")
    store.create_app("blog")
    lines = [LogLine(float(i), "app", f"run.{i % 2}", f"line {i}") for i in range(10)]
    store.append_log("shop", lines[:6], keep=5)
    store.append_log("shop", lines[6:], keep=5)
    store.append_log("blog", [LogLine(1.0, "heroku", "run.1", "other app")], keep=5)
    store.append_log("shop", [], keep=5)
    assert [line.message for line in store.read_log("shop")] == [f"line {i}" for i in range(5, 10)]
    assert store.read_log("shop", lines=2) == lines[8:]
    assert [line.message for line in store.read_log("shop", dyno="run.1")] == [
        "line 5",
        "line 7",
        "line 9",
    ]
    assert [line.message for line in store.read_log("blog")] == ["other app"]


# -- concurrency: several processes, as the front, the manager and other nodes -------


def _in_processes(
    where: Where, count: int, work: Callable[..., list[Any]], *args: object
) -> list[list[Any]]:
    """Run `work(store, index, *args)` in `count` processes at once; their results."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(count)
    results = ctx.Queue()
    workers = [
        ctx.Process(target=_worker, args=(where, barrier, results, work, i, *args))
        for i in range(count)
    ]
    for process in workers:
        process.start()
    try:
        out = [results.get(timeout=120) for _ in workers]
    finally:
        for process in workers:
            process.join(30)
    assert [p.exitcode for p in workers] == [0] * count
    errors = [o for o in out if isinstance(o, str)]
    assert not errors, errors
    return out


def _worker(where: Where, barrier: Any, results: Any, work: Callable[..., Any], *args: Any) -> None:
    try:
        store = where.open(node=f"node-{args[0]}")
        barrier.wait(60)
        results.put(work(store, *args))
    except BaseException as exc:
        results.put(f"{type(exc).__name__}: {exc}")


def _add_releases(store: Store, index: int, slug: str, sha: str, count: int) -> list[int]:
    size = Path(slug).stat().st_size
    return [
        store.add_release("shop", sha, size, 1, {}, slug=Path(slug)).version for _ in range(count)
    ]


def _create_dynos(store: Store, index: int, count: int, limit: int | None) -> list[str]:
    names = []
    for _ in range(count):
        try:
            names.append(store.create_dyno("shop", "bash", "standard-1x", 1, True, limit).name)
        except DynoLimitReached:
            names.append("refused")
    return names


def test_release_versions_stay_unique_under_concurrency(
    store: Store, where: Where, tmp_path: Path
) -> None:
    store.create_app("shop")
    slug, sha = _slug(tmp_path / "a.tgz", 1024**2 + 7)
    results = _in_processes(where, 2, _add_releases, str(slug), sha, 10)
    versions = sorted(v for result in results for v in result)
    assert versions == list(range(1, 21))
    assert [r.version for r in store.list_releases("shop")] == versions
    store.write_slug("shop", 20, tmp_path / "out.tgz")
    assert (tmp_path / "out.tgz").read_bytes() == slug.read_bytes()


def test_run_numbers_stay_unique_under_concurrency(store: Store, where: Where) -> None:
    store.create_app("shop")
    results = _in_processes(where, 4, _create_dynos, 15, None)
    names = [name for result in results for name in result]
    assert sorted(names) == sorted(f"run.{n}" for n in range(1, 61))
    assert {d.node for d in store.list_dynos("shop")} == {f"node-{i}" for i in range(4)}


def test_the_per_app_limit_holds_under_concurrency(store: Store, where: Where) -> None:
    store.create_app("shop")
    results = _in_processes(where, 4, _create_dynos, 4, 5)
    started = [name for result in results for name in result if name != "refused"]
    assert len(started) == 5
    assert sorted(started) == [f"run.{n}" for n in range(1, 6)]
    assert len(store.list_dynos("shop", running=True)) == 5


# -- PostgreSQL going away and coming back -------------------------------------------


def test_postgresql_down_gives_one_clear_error_and_back_works_again(
    own_postgres: PostgresServer, tmp_path: Path
) -> None:
    where, store = _shop_on(own_postgres, tmp_path)
    # Restarted while this process was idle: the next call just works.
    own_postgres.restart()
    assert store.app("shop").name == "shop"
    own_postgres.stop()
    for call in (
        store.list_apps,
        lambda: store.create_dyno("shop", "bash", "standard-1x", 1, True),
        lambda: store.schema_version,
    ):
        began = time.monotonic()
        with pytest.raises(StoreUnavailable) as down:
            call()
        assert time.monotonic() - began < 6
        message = str(down.value)
        prefix = f"the state database is unavailable (PostgreSQL {where.database_url}):"
        assert message.startswith(prefix)
        assert "refused" in message
    with pytest.raises(StoreUnavailable):
        where.open()  # a process starting now is told the same
    own_postgres.start()
    assert [a.name for a in store.list_apps()] == ["shop"]
    assert store.create_dyno("shop", "bash", "standard-1x", 1, True).name == "run.1"


def test_postgresql_restarted_under_load(own_postgres: PostgresServer, tmp_path: Path) -> None:
    """Dynos allocated in a loop while the server restarts: each call either works or
    raises StoreUnavailable, and run.N stays unique."""
    _, store = _shop_on(own_postgres, tmp_path)
    restarted = threading.Event()
    names: list[str] = []
    failures: list[BaseException] = []

    def restart() -> None:
        time.sleep(0.3)
        own_postgres.restart()
        restarted.set()

    thread = threading.Thread(target=restart)
    thread.start()
    deadline = time.monotonic() + 60
    after = 0
    while after < 20 and time.monotonic() < deadline:
        try:
            names.append(store.create_dyno("shop", "bash", "standard-1x", 1, True).name)
            store.end_dyno("shop", names[-1], State.COMPLETE, 0, None)
            after += restarted.is_set()
        except Exception as exc:
            failures.append(exc)
            time.sleep(0.05)
    thread.join()
    assert after == 20, failures[-1:]
    assert failures, "the restart should have been noticed"
    assert {type(f) for f in failures} == {StoreUnavailable}
    assert len(set(names)) == len(names)
    recorded = [d.name for d in store.list_dynos("shop")]
    assert set(names) <= set(recorded)


# The schema as the gateway shipped it at v4, before the store had two backends.
V4_SCHEMA = """
CREATE TABLE apps (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    size TEXT NOT NULL DEFAULT 'standard-1x',
    run_counter INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE TABLE releases (
    id INTEGER PRIMARY KEY,
    app_id INTEGER NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    slug_sha256 TEXT NOT NULL,
    slug_size INTEGER NOT NULL,
    unpacked_size INTEGER NOT NULL,
    procfile TEXT NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (app_id, version)
);
CREATE TABLE config_vars (
    app_id INTEGER NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (app_id, key)
);
CREATE TABLE app_keys (
    app_id INTEGER NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    fingerprint TEXT NOT NULL,
    public_key TEXT NOT NULL,
    comment TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    PRIMARY KEY (app_id, fingerprint)
);
CREATE TABLE dynos (
    id INTEGER PRIMARY KEY,
    app_id INTEGER NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    command TEXT NOT NULL,
    size TEXT NOT NULL,
    release_version INTEGER NOT NULL,
    attached INTEGER NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    ended_at REAL,
    exit_status INTEGER,
    exit_signal TEXT,
    UNIQUE (app_id, name)
);
CREATE INDEX dynos_by_state ON dynos (state);
CREATE TABLE log_lines (
    id INTEGER PRIMARY KEY,
    app_id INTEGER NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    at REAL NOT NULL,
    source TEXT NOT NULL,
    dyno TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX log_lines_by_app ON log_lines (app_id, id);
CREATE TABLE api_tokens (
    id INTEGER PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    apps TEXT NOT NULL,
    created_at REAL NOT NULL
);
ALTER TABLE dynos ADD COLUMN pid INTEGER;
ALTER TABLE dynos ADD COLUMN pid_started INTEGER;
"""
