"""The store's one interface: typed queries, written once for both backends.

The queries are in the SQL that SQLite and PostgreSQL share, with `?` placeholders and
named result columns. A backend (sqlite.py, postgres.py) supplies the connection, the
transactions, the locks that serialize allocations, the migrations' bookkeeping and the
place slugs are kept. Each process (admin CLI, SSH front, dyno manager) opens its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Sequence
from contextlib import AbstractContextManager, closing, nullcontext
from pathlib import Path

from gateway.core.dyno import ENDED, State
from gateway.store.applog_queries import AppLogQueries
from gateway.store.nodes import NodeQueries
from gateway.store.records import (
    App,
    AppKey,
    DynoLimitReached,
    DynoRecord,
    Listener,
    Release,
    StoreError,
    Usage,
)
from gateway.store.schema import LATEST, MIGRATIONS
from gateway.store.slug_digest import check_slug
from gateway.store.sql import Row, SlugKeeper, Transaction
from gateway.store.usage_queries import UsageQueries


class Store(NodeQueries, AppLogQueries, UsageQueries, ABC):
    """The gateway's state. Subclasses: SQLiteStore, PostgresStore (open_store picks)."""

    backend: str  # "sqlite" or "postgresql"
    # Whether other nodes share this database (their dynos are in it too).
    shared: bool

    def __init__(self, node: str | None = None) -> None:
        self.node = node or socket.gethostname()

    # -- what a backend provides ---------------------------------------------------------

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def describe(self) -> str:
        """The backend and where its data is, for `gateway check` (never a password)."""

    @property
    @abstractmethod
    def schema_version(self) -> int: ...

    @abstractmethod
    def _migrate_from(self, apply: Callable[[Transaction, int], None]) -> int:
        """Run `apply(tx, version)` under the migration lock, record the new version;
        return it."""

    @abstractmethod
    def _query(self, sql: str, args: Sequence[object] = ()) -> list[Row]:
        """The rows of one read, outside any transaction."""

    @abstractmethod
    def _transaction(self) -> AbstractContextManager[Transaction]:
        """A write transaction: committed when the block ends, rolled back if it raises."""

    @abstractmethod
    def _lock_app(self, tx: Transaction, app_id: int) -> None:
        """Hold the app's row until the transaction ends: its counters (vN, run.N) and
        the count of its running dynos stay as read until then."""

    @abstractmethod
    def _duplicate(self, exc: BaseException) -> bool:
        """Whether `exc` is the backend's unique-constraint violation."""

    @abstractmethod
    def _slug_keeper(
        self, app: App, slug: Path, sha256: str, size: int
    ) -> AbstractContextManager[SlugKeeper]:
        """What keeps `slug` (its digest checked) with the release the block makes; it
        undoes what it did if the block raises."""

    @abstractmethod
    def _slug_chunks(self, app: App, release: Release) -> Generator[bytes, None, None]:
        """The stored slug of `release`, in order."""

    # -- schema ----------------------------------------------------------------------

    def migrate(self) -> int:
        """Bring the schema to the latest version; return the version it is at."""

        def apply(tx: Transaction, version: int) -> None:
            for step in MIGRATIONS[version:]:
                for statement in step.statements(self.backend):
                    tx.execute(statement)

        return self._migrate_from(apply)

    @property
    def latest_version(self) -> int:
        return LATEST

    def _one(self, sql: str, args: Sequence[object] = ()) -> Row | None:
        rows = self._query(sql, args)
        return rows[0] if rows else None

    # -- apps ------------------------------------------------------------------------

    def create_app(self, name: str) -> App:
        now = time.time()
        try:
            with self._transaction() as tx:
                row = tx.execute(
                    "INSERT INTO apps (name, created_at) VALUES (?, ?) RETURNING id", (name, now)
                ).fetchone()
        except Exception as exc:
            if self._duplicate(exc):
                raise StoreError(f"app {name!r} already exists") from None
            raise
        return App(id=row["id"], name=name, size="standard-1x", created_at=now)

    def get_app(self, name: str) -> App | None:
        row = self._one(f"SELECT {_APP} FROM apps WHERE name = ?", (name,))
        return App(**row) if row else None

    def app(self, name: str) -> App:
        """The app called `name`, or StoreError saying it does not exist."""
        found = self.get_app(name)
        if found is None:
            raise StoreError(f"no such app: {name!r}")
        return found

    def list_apps(self) -> list[App]:
        rows = self._query(f"SELECT {_APP} FROM apps ORDER BY name")
        return [App(**row) for row in rows]

    def set_app_size(self, app: str, size: str | None, max_size: str | None = None) -> None:
        """The size an app's dynos get unless a run asks for another (None: unchanged),
        and the largest they may ask for (None: unchanged; "" lifts the cap)."""
        app_id = self.app(app).id
        with self._transaction() as tx:
            if size is not None:
                tx.execute("UPDATE apps SET size = ? WHERE id = ?", (size, app_id))
            if max_size is not None:
                cap = max_size or None
                tx.execute("UPDATE apps SET max_size = ? WHERE id = ?", (cap, app_id))

    def app_uid(self, app: str, first: int, last: int) -> int:
        """The app's own uid (its gid too), granted now from first..last if it has none:
        the next after every uid ever granted, so none is ever granted twice."""
        found = self.app(app)
        row = self._one("SELECT uid FROM app_uids WHERE app_id = ?", (found.id,))
        if row is not None:
            return int(row["uid"])
        with self._transaction() as tx:
            self._lock_app(tx, found.id)  # and the UNIQUE app_id: one grant per app
            row = tx.execute("SELECT uid FROM app_uids WHERE app_id = ?", (found.id,)).fetchone()
            if row is not None:
                return int(row["uid"])
            top = tx.execute("SELECT MAX(uid) AS top FROM app_uids").fetchone()["top"]
            uid = first if top is None else max(first, int(top) + 1)
            if uid > last:
                raise StoreError(
                    f"the dyno uid range {first}-{last} is used up: widen dynos.uid_range"
                )
            tx.execute(
                "INSERT INTO app_uids (uid, app_id, granted_at) VALUES (?, ?, ?)",
                (uid, found.id, time.time()),
            )
        return uid

    # -- releases --------------------------------------------------------------------

    def add_release(
        self,
        app: str,
        slug_sha256: str,
        slug_size: int,
        unpacked_size: int,
        procfile: dict[str, str],
        place: Callable[[int], None] | None = None,
        slug: Path | None = None,
    ) -> Release:
        """Record a new release vN+1. `slug`, the archive itself, is kept with it (checked
        against `slug_sha256` and `slug_size`): in the database, or as a file with SQLite.
        `place(version)` runs inside the transaction, so the unpacked tree is moved into
        `releases/APP/vN` exactly when vN is allocated; if it fails, no release is recorded
        and no slug kept."""
        found = self.app(app)
        now = time.time()
        keeping = self._slug_keeper(found, slug, slug_sha256, slug_size) if slug else None
        with keeping or nullcontext(SlugKeeper()) as keeper, self._transaction() as tx:
            keeper.store(tx)
            self._lock_app(tx, found.id)
            row = tx.execute(
                "SELECT COALESCE(MAX(version), 0) AS last FROM releases WHERE app_id = ?",
                (found.id,),
            ).fetchone()
            version = row["last"] + 1
            tx.execute(
                "INSERT INTO releases (app_id, version, slug_sha256, slug_size, unpacked_size,"
                " procfile, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (found.id, version, slug_sha256, slug_size, unpacked_size,
                 json.dumps(procfile), now),
            )  # fmt: skip
            keeper.place(version)
            if place is not None:
                place(version)
        return Release(app, version, slug_sha256, slug_size, unpacked_size, procfile, now)

    def _release(self, app: str, row: Row) -> Release:
        return Release(
            app=app,
            version=row["version"],
            slug_sha256=row["slug_sha256"],
            slug_size=row["slug_size"],
            unpacked_size=row["unpacked_size"],
            procfile=json.loads(row["procfile"]),
            created_at=row["created_at"],
        )

    def list_releases(self, app: str) -> list[Release]:
        rows = self._query(
            "SELECT * FROM releases WHERE app_id = ? ORDER BY version", (self.app(app).id,)
        )
        return [self._release(app, row) for row in rows]

    def latest_release(self, app: str) -> Release | None:
        row = self._one(
            "SELECT * FROM releases WHERE app_id = ? ORDER BY version DESC LIMIT 1",
            (self.app(app).id,),
        )
        return self._release(app, row) if row else None

    def get_release(self, app: str, version: int) -> Release | None:
        row = self._one(
            "SELECT * FROM releases WHERE app_id = ? AND version = ?", (self.app(app).id, version)
        )
        return self._release(app, row) if row else None

    def write_slug(self, app: str, version: int, dest: Path) -> Release:
        """Copy release vN's slug out of the store to `dest`, the file appearing only once
        its SHA-256 and size match the release's (else SlugCorrupt, and no file). What a
        node calls to unpack a release it has not seen."""
        found = self.app(app)
        release = self.get_release(app, version)
        if release is None:
            raise StoreError(f"no release v{version} of {app!r}")
        partial = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.partial")
        digest, size = hashlib.sha256(), 0
        try:
            with open(partial, "xb") as out, closing(self._slug_chunks(found, release)) as chunks:
                for chunk in chunks:
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
            check_slug(f"slug of {app} v{version}", release, digest.hexdigest(), size)
            os.replace(partial, dest)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return release

    # -- config vars -----------------------------------------------------------------

    def set_config(self, app: str, values: dict[str, str]) -> None:
        app_id = self.app(app).id
        with self._transaction() as tx:
            tx.executemany(
                "INSERT INTO config_vars (app_id, key, value) VALUES (?, ?, ?)"
                " ON CONFLICT (app_id, key) DO UPDATE SET value = excluded.value",
                [(app_id, k, v) for k, v in values.items()],
            )

    def unset_config(self, app: str, keys: list[str]) -> None:
        app_id = self.app(app).id
        with self._transaction() as tx:
            tx.executemany(
                "DELETE FROM config_vars WHERE app_id = ? AND key = ?", [(app_id, k) for k in keys]
            )

    def get_config(self, app: str) -> dict[str, str]:
        rows = self._query(
            "SELECT key, value FROM config_vars WHERE app_id = ? ORDER BY key",
            (self.app(app).id,),
        )
        return {row["key"]: row["value"] for row in rows}

    # -- authorized keys -------------------------------------------------------------

    def add_key(self, app: str, fingerprint: str, public_key: str, comment: str) -> bool:
        """Authorize a key for `app`; False when it already was."""
        app_id = self.app(app).id
        with self._transaction() as tx:
            cur = tx.execute(
                "INSERT INTO app_keys (app_id, fingerprint, public_key, comment, created_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (app_id, fingerprint, public_key, comment, time.time()),
            )
            return cur.rowcount == 1

    def remove_key(self, app: str, fingerprint: str) -> bool:
        app_id = self.app(app).id
        with self._transaction() as tx:
            cur = tx.execute(
                "DELETE FROM app_keys WHERE app_id = ? AND fingerprint = ?", (app_id, fingerprint)
            )
            return cur.rowcount == 1

    def list_keys(self, app: str) -> list[AppKey]:
        rows = self._query(
            "SELECT fingerprint, public_key, comment FROM app_keys WHERE app_id = ?"
            " ORDER BY created_at",
            (self.app(app).id,),
        )
        return [AppKey(**row) for row in rows]

    def has_key(self, app: str, fingerprint: str) -> bool:
        """Whether `fingerprint` may open sessions for `app` (False for an unknown app)."""
        row = self._one(
            "SELECT 1 AS found FROM app_keys JOIN apps ON apps.id = app_keys.app_id"
            " WHERE apps.name = ? AND app_keys.fingerprint = ?",
            (app, fingerprint),
        )
        return row is not None

    # -- dynos -----------------------------------------------------------------------

    def create_dyno(
        self,
        app: str,
        command: str,
        size: str,
        release_version: int,
        attached: bool,
        max_running: int | None = None,
    ) -> DynoRecord:
        """Allocate the app's next `run.N` (never reused, unique over every node) and
        record the dyno as starting on this node. With `max_running`, only if the app
        runs fewer dynos than that, counted in the same transaction (else
        DynoLimitReached, and no number is used up)."""
        app_id = self.app(app).id
        now = time.time()
        with self._transaction() as tx:
            self._lock_app(tx, app_id)
            if max_running is not None:
                running = tx.execute(
                    "SELECT COUNT(*) AS n FROM dynos WHERE app_id = ? AND ended_at IS NULL",
                    (app_id,),
                ).fetchone()["n"]
                if running >= max_running:
                    raise DynoLimitReached(app, running, max_running)
            number = tx.execute(
                "UPDATE apps SET run_counter = run_counter + 1 WHERE id = ?"
                " RETURNING run_counter AS n",
                (app_id,),
            ).fetchone()["n"]
            name = f"run.{number}"
            tx.execute(
                "INSERT INTO dynos (app_id, name, command, size, release_version, attached,"
                " state, created_at, updated_at, node) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (app_id, name, command, size, release_version, attached, str(State.STARTING),
                 now, now, self.node),
            )  # fmt: skip
        created = self.get_dyno(app, name)
        assert created is not None  # written by the transaction just committed
        return created

    def set_dyno_process(self, app: str, name: str, pid: int, started: int) -> None:
        """The dyno's process (its group leader) and its start time in clock ticks, so
        that a manager starting after a crash can end what its predecessor left."""
        with self._transaction() as tx:
            tx.execute(
                "UPDATE dynos SET pid = ?, pid_started = ? WHERE name = ?"
                " AND app_id = (SELECT id FROM apps WHERE name = ?)",
                (pid, started, name, app),
            )

    def set_dyno_state(self, app: str, name: str, state: State) -> None:
        with self._transaction() as tx:
            tx.execute(
                "UPDATE dynos SET state = ?, updated_at = ? WHERE name = ?"
                " AND app_id = (SELECT id FROM apps WHERE name = ?)",
                (str(state), time.time(), name, app),
            )

    def end_dyno(
        self,
        app: str,
        name: str,
        state: State,
        exit_status: int | None,
        exit_signal: str | None,
    ) -> None:
        """Close a dyno's record with how it ended."""
        assert state in ENDED
        now = time.time()
        with self._transaction() as tx:
            tx.execute(
                "UPDATE dynos SET state = ?, updated_at = ?, ended_at = ?, exit_status = ?,"
                " exit_signal = ? WHERE name = ? AND app_id = (SELECT id FROM apps WHERE name = ?)",
                (str(state), now, now, exit_status, exit_signal, name, app),
            )

    def get_dyno(self, app: str, name: str) -> DynoRecord | None:
        row = self._one(
            "SELECT apps.name AS app, dynos.* FROM dynos JOIN apps ON apps.id = dynos.app_id"
            " WHERE apps.name = ? AND dynos.name = ?",
            (app, name),
        )
        return DynoRecord.from_row(row) if row else None

    def list_dynos(
        self, app: str | None = None, running: bool = False, node: str | None = None
    ) -> list[DynoRecord]:
        """Dynos, oldest first; `running` keeps those not yet ended, `node` those of one
        node."""
        sql = "SELECT apps.name AS app, dynos.* FROM dynos JOIN apps ON apps.id = dynos.app_id"
        clauses: list[str] = []
        args: list[object] = []
        if app is not None:
            clauses.append("apps.name = ?")
            args.append(app)
        if running:
            clauses.append("dynos.ended_at IS NULL")
        if node is not None:
            clauses.append("dynos.node = ?")
            args.append(node)
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        return [DynoRecord.from_row(row) for row in self._query(sql + " ORDER BY dynos.id", args)]

    def usage(self, app: str | None = None, since: float = 0.0) -> list[Usage]:
        """Wall-clock dyno-seconds of ended dynos, per app and size. A dyno a restart
        found running counts until that restart (its real end is unknown)."""
        sql = (
            "SELECT apps.name AS app, dynos.size AS size, COUNT(*) AS dynos,"
            " SUM(dynos.ended_at - dynos.created_at) AS seconds"
            " FROM dynos JOIN apps ON apps.id = dynos.app_id"
            " WHERE dynos.ended_at IS NOT NULL AND dynos.created_at >= ?"
        )
        args: list[object] = [since]
        if app is not None:
            sql += " AND apps.name = ?"
            args.append(self.app(app).name)
        rows = self._query(sql + " GROUP BY apps.name, dynos.size ORDER BY 1, 2", args)
        return [Usage(**row) for row in rows]

    # -- API tokens ------------------------------------------------------------------

    def add_token(self, token: str, apps: list[str]) -> None:
        """Grant `token` (kept only as its SHA-256) the Platform API for `apps`."""
        for app in apps:
            self.app(app)
        with self._transaction() as tx:
            tx.execute(
                "INSERT INTO api_tokens (token_sha256, apps, created_at) VALUES (?, ?, ?)",
                (_sha256(token), json.dumps(sorted(apps)), time.time()),
            )

    def token_apps(self, token: str) -> list[str] | None:
        """The apps `token` may use, or None for an unknown token."""
        row = self._one("SELECT apps FROM api_tokens WHERE token_sha256 = ?", (_sha256(token),))
        return json.loads(row["apps"]) if row else None

    # -- signals between nodes ---------------------------------------------------------

    def notify(self, channel: str, payload: str) -> None:
        """Tell the nodes listening on `channel` (PostgreSQL NOTIFY); one host alone
        (SQLite) has no one to tell."""

    def listener(self, channels: Sequence[str]) -> Listener | None:
        """A new connection listening on `channels`, or None where nodes share nothing."""
        return None


_APP = "id, name, size, created_at, max_size"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
