"""The embedded backend: one SQLite file (WAL) in state_dir, slugs as files beside it.

WAL lets the front read keys while the manager writes dyno records; writers take the
lock with BEGIN IMMEDIATE, so a counter can never be read twice and two processes never
allocate the same `run.N` or vN. The schema version is PRAGMA user_version, so state dirs
made before the PostgreSQL backend existed upgrade in place.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from gateway.store.base import Store
from gateway.store.records import App, Release, StoreError
from gateway.store.schema import SQLITE
from gateway.store.slug_digest import SLUG_CHUNK, copy_checked
from gateway.store.sql import Row, SlugKeeper, Transaction


class SQLiteStore(Store):
    """Typed queries over one SQLite database file; slugs under `slugs_dir/APP/vN.tgz`."""

    backend = SQLITE
    shared = False
    _now_sql = "((julianday('now') - 2440587.5) * 86400.0)"

    def __init__(self, path: Path, slugs_dir: Path | None = None, node: str | None = None) -> None:
        super().__init__(node)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Made 0600 before SQLite opens it: SQLite gives -wal and -shm the database's mode.
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        self.path = path
        self.slugs_dir = slugs_dir or path.parent / "slugs"
        self._db = sqlite3.connect(path, isolation_level=None, timeout=10.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")

    def close(self) -> None:
        self._db.close()

    def describe(self) -> str:
        return f"SQLite {self.path}"

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def _transaction(self) -> Iterator[Transaction]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db  # type: ignore[misc]
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _migrate_from(self, apply: Callable[[Transaction, int], None]) -> int:
        with self._transaction() as tx:
            version = self.schema_version
            apply(tx, version)
            latest = max(version, self.latest_version)
            tx.execute(f"PRAGMA user_version={latest}")
        return latest

    def _query(self, sql: str, args: Sequence[object] = ()) -> list[Row]:
        return self._db.execute(sql, args).fetchall()

    def _lock_app(self, tx: Transaction, app_id: int) -> None:
        pass  # BEGIN IMMEDIATE already holds the whole database

    def _duplicate(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.IntegrityError)

    @contextmanager
    def _slug_keeper(self, app: App, slug: Path, sha256: str, size: int) -> Iterator[SlugKeeper]:
        root = self.slugs_dir / app.name
        root.mkdir(parents=True, exist_ok=True)
        keeper = _SlugFile(root / f".incoming-{secrets.token_hex(4)}.tgz", root)
        # The slow copy before BEGIN IMMEDIATE, which would hold every writer up.
        copy_checked(slug, keeper.incoming, sha256, size, f"slug {slug}")
        try:
            yield keeper
        except BaseException:
            if keeper.placed is not None:
                keeper.placed.unlink(missing_ok=True)
            raise
        finally:
            keeper.incoming.unlink(missing_ok=True)

    def _slug_chunks(self, app: App, release: Release) -> Generator[bytes, None, None]:
        path = self.slugs_dir / app.name / f"v{release.version}.tgz"
        if not path.is_file():
            raise StoreError(f"the slug of {app.name} v{release.version} is missing: {path}")
        with open(path, "rb") as file:
            while chunk := file.read(SLUG_CHUNK):
                yield chunk


class _SlugFile(SlugKeeper):
    """A copied slug, renamed to `vN.tgz` once vN is allocated."""

    def __init__(self, incoming: Path, root: Path) -> None:
        self.incoming = incoming
        self.root = root
        self.placed: Path | None = None

    def place(self, version: int) -> None:
        self.placed = self.root / f"v{version}.tgz"
        self.incoming.rename(self.placed)
