"""The shared backend: PostgreSQL through psycopg 3, for gateways on several hosts.

Every node keeps one connection per process, made when first needed and made again after
it breaks: while the server is down each call raises StoreUnavailable (never a psycopg
error), and the first call after it is back works. Allocations lock the app's row
(`FOR NO KEY UPDATE`), so vN and `run.N` stay unique and `max_per_app` holds across all
nodes. Slugs live in the database, in chunk rows (see the schema's v5).
"""

from __future__ import annotations

import hashlib
import json
import select
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager, suppress
from functools import lru_cache
from pathlib import Path
from typing import Any

import psycopg
from psycopg import conninfo, pq, sql
from psycopg.rows import dict_row

from gateway.store.base import Store
from gateway.store.nodes import LOG_CHANNEL
from gateway.store.records import App, Listener, Notice, Release, StoreError, StoreUnavailable
from gateway.store.schema import POSTGRESQL
from gateway.store.slug_digest import SLUG_CHUNK, slug_mismatch
from gateway.store.sql import Cursor, Row, SlugKeeper, Transaction

# pg_advisory_xact_lock key that serializes migrations across nodes ("gw-schema").
MIGRATION_LOCK = 0x67772D736368656D
# Connection settings a database_url may override: give up connecting after 5 s, and
# notice a vanished server host within about 25 s of silence (15 s with data unacknowledged).
CONNECT_DEFAULTS: dict[str, Any] = {
    "connect_timeout": "5",
    "tcp_user_timeout": "15000",
    "application_name": "gateway",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
}


class PostgresStore(Store):
    """Typed queries over a PostgreSQL database every node shares."""

    backend = POSTGRESQL
    shared = True
    _now_sql = "EXTRACT(EPOCH FROM clock_timestamp())::float8"
    _lock_skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str, node: str | None = None) -> None:
        super().__init__(node)
        self.url = url
        self._params: dict[str, Any] = CONNECT_DEFAULTS | conninfo.conninfo_to_dict(url)
        self._conn: psycopg.Connection[Row] | None = None

    def close(self) -> None:
        self._drop()

    def describe(self) -> str:
        return f"PostgreSQL {self.url}"

    def server_version(self) -> str:
        """The server's version, such as 15.8."""
        with self._guard() as conn:
            number = conn.info.server_version
        return f"{number // 10000}.{number % 10000}"

    # -- the connection --------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Row]:
        conn = self._conn
        if conn is not None and (conn.closed or conn.broken or _has_input(conn)):
            # Idle, the server has nothing to say to us unless it is hanging up (a restart,
            # an administrator's kill): start afresh rather than fail the next statement.
            self._drop()
            conn = None
        if conn is None:
            conn = psycopg.connect(autocommit=True, row_factory=dict_row, **self._params)
            self._conn = conn
        return conn

    def _drop(self) -> None:
        if self._conn is not None:
            with suppress(Exception):
                self._conn.close()
            self._conn = None

    @contextmanager
    def _guard(self) -> Iterator[psycopg.Connection[Row]]:
        """The connection, with a failure to reach the server turned into StoreUnavailable
        (and the connection dropped, so that the next call connects again)."""
        try:
            with self._unavailable():
                yield self._connection()
        except StoreUnavailable:
            self._drop()
            raise

    @contextmanager
    def _unavailable(self) -> Iterator[None]:
        """A failure to reach the server, as StoreUnavailable saying why."""
        try:
            yield
        except psycopg.OperationalError as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StoreUnavailable(
                f"the state database is unavailable ({self.describe()}): {reason}"
            ) from None

    # -- the backend's part of the interface -----------------------------------------

    @property
    def schema_version(self) -> int:
        with self._guard() as conn:
            present = conn.execute("SELECT to_regclass('gateway_schema') AS t").fetchone()
            if present is None or present["t"] is None:
                return 0
            row = conn.execute("SELECT version FROM gateway_schema").fetchone()
        return row["version"] if row else 0

    def _migrate_from(self, apply: Callable[[Transaction, int], None]) -> int:
        with self._transaction() as tx:
            # Nodes starting together: one migrates, the others then find it done.
            tx.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
            tx.execute("CREATE TABLE IF NOT EXISTS gateway_schema (version INTEGER NOT NULL)")
            row = tx.execute("SELECT version FROM gateway_schema").fetchone()
            if row is None:
                tx.execute("INSERT INTO gateway_schema (version) VALUES (0)")
            version = row["version"] if row else 0
            apply(tx, version)
            latest = max(version, self.latest_version)
            tx.execute("UPDATE gateway_schema SET version = ?", (latest,))
        return latest

    def _query(self, sql: str, args: Sequence[object] = ()) -> list[Row]:
        with self._guard() as conn:
            return conn.execute(_pg(sql), args).fetchall()

    @contextmanager
    def _transaction(self) -> Iterator[Transaction]:
        with self._guard() as conn, conn.transaction():
            yield _PGTransaction(conn)

    def _lock_app(self, tx: Transaction, app_id: int) -> None:
        # NO KEY: releases and dynos being inserted for the app (foreign keys take KEY
        # SHARE) do not wait for it, nor it for them.
        tx.execute("SELECT id FROM apps WHERE id = ? FOR NO KEY UPDATE", (app_id,))

    def _log_appended(self, tx: Transaction, app: str, first: int, last: int) -> None:
        # Delivered when the transaction commits, to every node (their tails read it).
        payload = json.dumps({"node": self.node, "app": app, "first": first, "last": last})
        tx.execute("SELECT pg_notify(?, ?)", (LOG_CHANNEL, payload))

    def notify(self, channel: str, payload: str) -> None:
        self._query("SELECT pg_notify(?, ?) AS sent", (channel, payload))

    def listener(self, channels: Sequence[str]) -> Listener:
        return _Listener(self, channels)

    def _duplicate(self, exc: BaseException) -> bool:
        return isinstance(exc, psycopg.errors.UniqueViolation)

    @contextmanager
    def _slug_keeper(self, app: App, slug: Path, sha256: str, size: int) -> Iterator[SlugKeeper]:
        yield _ChunkUpload(app, slug, sha256, size)

    def _slug_chunks(self, app: App, release: Release) -> Generator[bytes, None, None]:
        with self._guard() as conn, conn.transaction():
            stored = conn.execute(
                "SELECT chunks FROM slugs WHERE app_id = %s AND sha256 = %s",
                (app.id, release.slug_sha256),
            ).fetchone()
            if stored is None:
                raise StoreError(f"the slug of {app.name} v{release.version} is not stored")
            # A server-side cursor: a few chunks in memory at a time, whatever the size.
            with conn.cursor(name="slug", binary=True) as cursor:
                cursor.itersize = 4
                cursor.execute(
                    "SELECT data FROM slug_chunks WHERE app_id = %s AND sha256 = %s ORDER BY seq",
                    (app.id, release.slug_sha256),
                )
                for row in cursor:
                    yield row["data"]


class _Listener:
    """A connection of its own that LISTENs: the store's may be replaced at any call
    (see _connection), which would end a LISTEN. Its notices are read without waiting
    (libpq's PQconsumeInput and PQnotifies), so the caller waits for its descriptor in
    its own event loop."""

    def __init__(self, store: PostgresStore, channels: Sequence[str]) -> None:
        self._store = store
        with store._unavailable():
            self._conn = psycopg.connect(autocommit=True, **store._params)
            try:
                for channel in channels:
                    self._conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            except BaseException:
                self._conn.close()
                raise

    def fileno(self) -> int:
        return self._conn.pgconn.socket

    def receive(self) -> list[Notice]:
        pgconn = self._conn.pgconn
        with self._store._unavailable():
            pgconn.consume_input()
            if pgconn.status != pq.ConnStatus.OK:
                raise psycopg.OperationalError("the server closed the connection")
        notices = []
        while (notice := pgconn.notifies()) is not None:
            notices.append(Notice(notice.relname.decode(), notice.extra.decode()))
        return notices

    def close(self) -> None:
        with suppress(Exception):
            self._conn.close()


class _PGTransaction:
    """The shared SQL's `?` placeholders, run as psycopg's `%s`."""

    def __init__(self, conn: psycopg.Connection[Row]) -> None:
        self.conn = conn

    def execute(self, sql: str, args: Sequence[object] = ()) -> Cursor:
        return self.conn.execute(_pg(sql), args)

    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        with self.conn.cursor() as cursor:
            cursor.executemany(_pg(sql), rows)


class _ChunkUpload(SlugKeeper):
    """Writes the slug as chunk rows in the release's transaction, before the app is
    locked. A slug the app already has (same digest) is not written again."""

    def __init__(self, app: App, slug: Path, sha256: str, size: int) -> None:
        self.app, self.slug, self.sha256, self.size = app, slug, sha256, size

    def store(self, tx: Transaction) -> None:
        conn: psycopg.Connection[Any] = tx.conn  # type: ignore[attr-defined]
        # Waits for a transaction storing the same slug: it commits (nothing to do) or
        # rolls back (this one stores it).
        new = conn.execute(
            "INSERT INTO slugs (app_id, sha256, size, chunks, created_at)"
            " VALUES (%s, %s, %s, 0, %s) ON CONFLICT DO NOTHING RETURNING chunks",
            (self.app.id, self.sha256, self.size, time.time()),
        ).fetchone()
        if new is None:
            return
        digest, count, seq = hashlib.sha256(), 0, 0
        with open(self.slug, "rb") as file:
            while chunk := file.read(SLUG_CHUNK):
                conn.execute(
                    "INSERT INTO slug_chunks (app_id, sha256, seq, data) VALUES (%s, %s, %s, %b)",
                    (self.app.id, self.sha256, seq, chunk),
                )
                digest.update(chunk)
                count += len(chunk)
                seq += 1
        if digest.hexdigest() != self.sha256 or count != self.size:
            raise slug_mismatch(f"slug {self.slug}", self.sha256, self.size, digest, count)
        conn.execute(
            "UPDATE slugs SET chunks = %s WHERE app_id = %s AND sha256 = %s",
            (seq, self.app.id, self.sha256),
        )


@lru_cache(maxsize=256)
def _pg(sql: str) -> str:
    """The shared SQL in psycopg's placeholder style."""
    return sql.replace("%", "%%").replace("?", "%s")


def _has_input(conn: psycopg.Connection[Any]) -> bool:
    """Whether the server has sent anything to this idle connection."""
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    return bool(poller.poll(0))
