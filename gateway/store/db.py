"""The gateway's state in SQLite (WAL): the only module that writes SQL.

Each process (admin CLI, SSH front, dyno manager) opens its own `Store`. WAL lets the
front read keys while the manager writes dyno records; writers take the lock with
BEGIN IMMEDIATE so a counter can never be read twice.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gateway.core.applog import LogLine
from gateway.core.dyno import ENDED, State
from gateway.core.protocol import DynoInfo
from gateway.store.schema import MIGRATIONS


class StoreError(Exception):
    """A request the state refuses: an unknown app, a duplicate name."""


@dataclass(frozen=True)
class App:
    id: int
    name: str
    size: str
    created_at: float


@dataclass(frozen=True)
class Release:
    app: str
    version: int
    slug_sha256: str
    slug_size: int
    unpacked_size: int
    procfile: dict[str, str]
    created_at: float


@dataclass(frozen=True)
class AppKey:
    fingerprint: str
    public_key: str
    comment: str


@dataclass(frozen=True)
class DynoRecord:
    app: str
    name: str
    command: str
    size: str
    release_version: int
    attached: bool
    state: str
    created_at: float
    updated_at: float
    ended_at: float | None
    exit_status: int | None
    exit_signal: str | None
    pid: int | None = None
    pid_started: int | None = None

    def info(self) -> DynoInfo:
        """The dyno as clients are told of it."""
        return DynoInfo(
            name=self.name, size=self.size, state=self.state, since=self.updated_at,
            command=self.command, attached=self.attached, created_at=self.created_at,
            release_version=self.release_version,
        )  # fmt: skip


@dataclass(frozen=True)
class Usage:
    app: str
    size: str
    dynos: int
    seconds: float


class Store:
    """Typed queries over one SQLite database file."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, timeout=10.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _migrate(self) -> None:
        with self._write() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version={number}")

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    # -- apps ------------------------------------------------------------------------

    def create_app(self, name: str) -> App:
        now = time.time()
        try:
            with self._write() as db:
                cur = db.execute("INSERT INTO apps (name, created_at) VALUES (?, ?)", (name, now))
        except sqlite3.IntegrityError:
            raise StoreError(f"app {name!r} already exists") from None
        return App(id=cur.lastrowid or 0, name=name, size="standard-1x", created_at=now)

    def get_app(self, name: str) -> App | None:
        row = self._db.execute(
            "SELECT id, name, size, created_at FROM apps WHERE name = ?", (name,)
        ).fetchone()
        return App(**row) if row else None

    def app(self, name: str) -> App:
        """The app called `name`, or StoreError saying it does not exist."""
        found = self.get_app(name)
        if found is None:
            raise StoreError(f"no such app: {name!r}")
        return found

    def list_apps(self) -> list[App]:
        rows = self._db.execute("SELECT id, name, size, created_at FROM apps ORDER BY name")
        return [App(**row) for row in rows]

    # -- releases --------------------------------------------------------------------

    def add_release(
        self,
        app: str,
        slug_sha256: str,
        slug_size: int,
        unpacked_size: int,
        procfile: dict[str, str],
        place: Callable[[int], None] | None = None,
    ) -> Release:
        """Record a new release vN+1. `place(version)` runs inside the transaction, so the
        unpacked tree is moved into `releases/APP/vN` exactly when vN is allocated; if it
        fails, no release is recorded."""
        app_id = self.app(app).id
        now = time.time()
        with self._write() as db:
            (last,) = db.execute(
                "SELECT COALESCE(MAX(version), 0) FROM releases WHERE app_id = ?", (app_id,)
            ).fetchone()
            version = last + 1
            db.execute(
                "INSERT INTO releases (app_id, version, slug_sha256, slug_size, unpacked_size,"
                " procfile, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (app_id, version, slug_sha256, slug_size, unpacked_size, json.dumps(procfile), now),
            )
            if place is not None:
                place(version)
        return Release(app, version, slug_sha256, slug_size, unpacked_size, procfile, now)

    def _release(self, app: str, row: sqlite3.Row) -> Release:
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
        rows = self._db.execute(
            "SELECT * FROM releases WHERE app_id = ? ORDER BY version", (self.app(app).id,)
        )
        return [self._release(app, row) for row in rows]

    def latest_release(self, app: str) -> Release | None:
        row = self._db.execute(
            "SELECT * FROM releases WHERE app_id = ? ORDER BY version DESC LIMIT 1",
            (self.app(app).id,),
        ).fetchone()
        return self._release(app, row) if row else None

    # -- config vars -----------------------------------------------------------------

    def set_config(self, app: str, values: dict[str, str]) -> None:
        app_id = self.app(app).id
        with self._write() as db:
            db.executemany(
                "INSERT INTO config_vars (app_id, key, value) VALUES (?, ?, ?)"
                " ON CONFLICT (app_id, key) DO UPDATE SET value = excluded.value",
                [(app_id, k, v) for k, v in values.items()],
            )

    def unset_config(self, app: str, keys: list[str]) -> None:
        app_id = self.app(app).id
        with self._write() as db:
            db.executemany(
                "DELETE FROM config_vars WHERE app_id = ? AND key = ?", [(app_id, k) for k in keys]
            )

    def get_config(self, app: str) -> dict[str, str]:
        rows = self._db.execute(
            "SELECT key, value FROM config_vars WHERE app_id = ? ORDER BY key",
            (self.app(app).id,),
        )
        return {row["key"]: row["value"] for row in rows}

    # -- authorized keys -------------------------------------------------------------

    def add_key(self, app: str, fingerprint: str, public_key: str, comment: str) -> bool:
        """Authorize a key for `app`; False when it already was."""
        app_id = self.app(app).id
        with self._write() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO app_keys (app_id, fingerprint, public_key, comment,"
                " created_at) VALUES (?, ?, ?, ?, ?)",
                (app_id, fingerprint, public_key, comment, time.time()),
            )
        return cur.rowcount == 1

    def remove_key(self, app: str, fingerprint: str) -> bool:
        app_id = self.app(app).id
        with self._write() as db:
            cur = db.execute(
                "DELETE FROM app_keys WHERE app_id = ? AND fingerprint = ?", (app_id, fingerprint)
            )
        return cur.rowcount == 1

    def list_keys(self, app: str) -> list[AppKey]:
        rows = self._db.execute(
            "SELECT fingerprint, public_key, comment FROM app_keys WHERE app_id = ?"
            " ORDER BY created_at",
            (self.app(app).id,),
        )
        return [AppKey(**row) for row in rows]

    def has_key(self, app: str, fingerprint: str) -> bool:
        """Whether `fingerprint` may open sessions for `app` (False for an unknown app)."""
        row = self._db.execute(
            "SELECT 1 FROM app_keys JOIN apps ON apps.id = app_keys.app_id"
            " WHERE apps.name = ? AND app_keys.fingerprint = ?",
            (app, fingerprint),
        ).fetchone()
        return row is not None

    # -- dynos -----------------------------------------------------------------------

    def create_dyno(
        self, app: str, command: str, size: str, release_version: int, attached: bool
    ) -> DynoRecord:
        """Allocate the app's next `run.N` (never reused) and record the dyno as starting."""
        app_id = self.app(app).id
        now = time.time()
        with self._write() as db:
            (number,) = db.execute(
                "UPDATE apps SET run_counter = run_counter + 1 WHERE id = ? RETURNING run_counter",
                (app_id,),
            ).fetchone()
            name = f"run.{number}"
            db.execute(
                "INSERT INTO dynos (app_id, name, command, size, release_version, attached,"
                " state, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (app_id, name, command, size, release_version, attached, State.STARTING, now, now),
            )
        created = self.get_dyno(app, name)
        assert created is not None  # written by the transaction just committed
        return created

    def set_dyno_process(self, app: str, name: str, pid: int, started: int) -> None:
        """The dyno's process (its group leader) and its start time in clock ticks, so
        that a manager starting after a crash can end what its predecessor left."""
        with self._write() as db:
            db.execute(
                "UPDATE dynos SET pid = ?, pid_started = ? WHERE name = ?"
                " AND app_id = (SELECT id FROM apps WHERE name = ?)",
                (pid, started, name, app),
            )

    def set_dyno_state(self, app: str, name: str, state: State) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE dynos SET state = ?, updated_at = ? WHERE name = ?"
                " AND app_id = (SELECT id FROM apps WHERE name = ?)",
                (state, time.time(), name, app),
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
        with self._write() as db:
            db.execute(
                "UPDATE dynos SET state = ?, updated_at = ?, ended_at = ?, exit_status = ?,"
                " exit_signal = ? WHERE name = ? AND app_id = (SELECT id FROM apps WHERE name = ?)",
                (state, now, now, exit_status, exit_signal, name, app),
            )

    def get_dyno(self, app: str, name: str) -> DynoRecord | None:
        row = self._db.execute(
            "SELECT apps.name AS app, dynos.* FROM dynos JOIN apps ON apps.id = dynos.app_id"
            " WHERE apps.name = ? AND dynos.name = ?",
            (app, name),
        ).fetchone()
        return _dyno(row) if row else None

    def list_dynos(self, app: str | None = None, running: bool = False) -> list[DynoRecord]:
        """Dynos, newest last; `running` keeps those not yet ended."""
        sql = "SELECT apps.name AS app, dynos.* FROM dynos JOIN apps ON apps.id = dynos.app_id"
        clauses, args = [], []
        if app is not None:
            clauses.append("apps.name = ?")
            args.append(app)
        if running:
            clauses.append("dynos.ended_at IS NULL")
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        rows = self._db.execute(sql + " ORDER BY dynos.id", args)
        return [_dyno(row) for row in rows]

    def set_app_size(self, app: str, size: str) -> None:
        """The size an app's dynos get unless a run asks for another."""
        app_id = self.app(app).id
        with self._write() as db:
            db.execute("UPDATE apps SET size = ? WHERE id = ?", (size, app_id))

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
        rows = self._db.execute(sql + " GROUP BY apps.name, dynos.size ORDER BY 1, 2", args)
        return [Usage(**row) for row in rows]

    # -- API tokens ------------------------------------------------------------------

    def add_token(self, token: str, apps: list[str]) -> None:
        """Grant `token` (kept only as its SHA-256) the Platform API for `apps`."""
        for app in apps:
            self.app(app)
        with self._write() as db:
            db.execute(
                "INSERT INTO api_tokens (token_sha256, apps, created_at) VALUES (?, ?, ?)",
                (_sha256(token), json.dumps(sorted(apps)), time.time()),
            )

    def token_apps(self, token: str) -> list[str] | None:
        """The apps `token` may use, or None for an unknown token."""
        row = self._db.execute(
            "SELECT apps FROM api_tokens WHERE token_sha256 = ?", (_sha256(token),)
        ).fetchone()
        return json.loads(row["apps"]) if row else None

    # -- the app log -----------------------------------------------------------------

    def append_log(self, app: str, lines: list[LogLine], keep: int) -> None:
        """Add lines to the app's log, keeping only its newest `keep` lines."""
        if not lines:
            return
        app_id = self.app(app).id
        with self._write() as db:
            db.executemany(
                "INSERT INTO log_lines (app_id, at, source, dyno, message) VALUES (?, ?, ?, ?, ?)",
                [(app_id, line.at, line.source, line.dyno, line.message) for line in lines],
            )
            db.execute(
                "DELETE FROM log_lines WHERE app_id = ? AND id <= (SELECT id FROM log_lines"
                " WHERE app_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (app_id, app_id, keep),
            )

    def read_log(self, app: str, dyno: str | None = None, lines: int = 100) -> list[LogLine]:
        """The app's last `lines` log lines (of one dyno, if given), oldest first."""
        sql = "SELECT at, source, dyno, message FROM log_lines WHERE app_id = ?"
        args: list[object] = [self.app(app).id]
        if dyno is not None:
            sql += " AND dyno = ?"
            args.append(dyno)
        rows = self._db.execute(sql + " ORDER BY id DESC LIMIT ?", [*args, lines]).fetchall()
        return [LogLine(**row) for row in reversed(rows)]


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _dyno(row: sqlite3.Row) -> DynoRecord:
    return DynoRecord(
        app=row["app"],
        name=row["name"],
        command=row["command"],
        size=row["size"],
        release_version=row["release_version"],
        attached=bool(row["attached"]),
        state=row["state"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        ended_at=row["ended_at"],
        exit_status=row["exit_status"],
        exit_signal=row["exit_signal"],
        pid=row["pid"],
        pid_started=row["pid_started"],
    )
