"""The gateway's state behind one interface: SQLite in state_dir, or PostgreSQL when
`database_url` is set. This package is the only code that writes SQL."""

from __future__ import annotations

from gateway.config import Config
from gateway.store.base import Store
from gateway.store.records import (
    UNAVAILABLE_MESSAGE,
    App,
    AppKey,
    DynoLimitReached,
    DynoRecord,
    Release,
    SlugCorrupt,
    StoreError,
    StoreUnavailable,
    Usage,
)
from gateway.store.sqlite import SQLiteStore

__all__ = [
    "UNAVAILABLE_MESSAGE",
    "App",
    "AppKey",
    "DynoLimitReached",
    "DynoRecord",
    "Release",
    "SQLiteStore",
    "SlugCorrupt",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "Usage",
    "open_store",
]


def open_store(config: Config, *, migrate: bool = True, node: str | None = None) -> Store:
    """The store `config` names (`database_url`, else SQLite in state_dir), its schema
    brought up to date unless `migrate` is False. `node` names this host in the dyno
    records (default: [cluster] node, else the host name)."""
    store: Store
    if config.database_url:
        # psycopg is loaded only by gateways that use it.
        from gateway.store.postgres import PostgresStore

        store = PostgresStore(config.database_url, node or config.cluster.node_name)
    else:
        store = SQLiteStore(config.db_path, config.slugs_dir, node or config.cluster.node_name)
    if migrate:
        try:
            store.migrate()
        except BaseException:
            store.close()
            raise
    return store
