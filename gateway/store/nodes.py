"""The store's queries about nodes: heartbeats, `gateway nodes`, and closing the dynos of
a node that went silent. Part of Store (base.py), kept apart to keep each module small.

Times here are the database's clock (`_now_sql`), so that nodes whose clocks disagree
still agree on who is silent.
"""

from __future__ import annotations

import hashlib
from abc import abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager

from gateway.core.dyno import State
from gateway.store.records import DynoRecord, NodeRecord
from gateway.store.sql import Row, Transaction

UP, STOPPED, DEAD = "up", "stopped", "dead"
# PostgreSQL channels: app log rows a node added (every node listens), and one per node
# for requests to it (a stop). Identifiers are at most 63 bytes: a node's is a digest.
LOG_CHANNEL = "gateway_log"


def node_channel(node: str) -> str:
    """The channel `node` listens on for requests meant for it."""
    return "gateway_node_" + hashlib.sha256(node.encode()).hexdigest()[:32]


class NodeQueries:
    node: str
    # SQL for "now" in seconds since the epoch, by the database's clock.
    _now_sql: str
    # What a SELECT appends to lock the rows it reads, skipping those another holds.
    _lock_skip_locked: str = ""

    @abstractmethod
    def _query(self, sql: str, args: Sequence[object] = ()) -> list[Row]: ...

    @abstractmethod
    def _transaction(self) -> AbstractContextManager[Transaction]: ...

    def heartbeat(self, public_host: str, capacity: int, state: str = UP) -> str | None:
        """Record that this node is alive (or, with `state`, that it stopped); the state
        its row had before, None for a node new to the database. DEAD means the others
        declared it dead and closed its dynos meanwhile."""
        with self._transaction() as tx:
            row = tx.execute("SELECT state FROM nodes WHERE name = ?", (self.node,)).fetchone()
            now = tx.execute(f"SELECT {self._now_sql} AS now").fetchone()["now"]
            if row is None:
                tx.execute(
                    "INSERT INTO nodes (name, public_host, state, started_at, heartbeat_at,"
                    " capacity) VALUES (?, ?, ?, ?, ?, ?)",
                    (self.node, public_host, state, now, now, capacity),
                )
                return None
            tx.execute(
                "UPDATE nodes SET public_host = ?, state = ?, heartbeat_at = ?, capacity = ?"
                + (", started_at = ?" if row["state"] != UP else "")
                + " WHERE name = ?",
                (public_host, state, now, capacity, *([now] if row["state"] != UP else []),
                 self.node),
            )  # fmt: skip
            return str(row["state"])

    def list_nodes(self) -> list[NodeRecord]:
        rows = self._query(
            f"SELECT nodes.*, {self._now_sql} - heartbeat_at AS silent_for,"
            " (SELECT COUNT(*) FROM dynos WHERE dynos.node = nodes.name"
            " AND dynos.ended_at IS NULL) AS dynos FROM nodes ORDER BY name"
        )
        return [_node(row) for row in rows]

    def close_dead_nodes(self, dead_after: float) -> list[DynoRecord]:
        """Mark the nodes silent for over `dead_after` seconds dead, and close the dynos
        they ran as crashed, in one transaction (a node reaping at the same time skips
        the rows this one holds); the dynos closed, as they were before."""
        closed: list[DynoRecord] = []
        with self._transaction() as tx:
            dead = tx.execute(
                f"SELECT name FROM nodes WHERE state = ? AND name <> ?"
                f" AND heartbeat_at < {self._now_sql} - ?{self._lock_skip_locked}",
                (UP, self.node, dead_after),
            ).fetchall()
            for row in dead:
                name = row["name"]
                tx.execute("UPDATE nodes SET state = ? WHERE name = ?", (DEAD, name))
                running = tx.execute(
                    "SELECT apps.name AS app, dynos.* FROM dynos JOIN apps ON"
                    " apps.id = dynos.app_id WHERE dynos.node = ? AND dynos.ended_at IS NULL"
                    " ORDER BY dynos.id",
                    (name,),
                ).fetchall()
                tx.execute(
                    f"UPDATE dynos SET state = ?, updated_at = {self._now_sql},"
                    f" ended_at = {self._now_sql} WHERE node = ? AND ended_at IS NULL",
                    (str(State.CRASHED), name),
                )
                closed += [DynoRecord.from_row(dyno) for dyno in running]
        return closed


def _node(row: Row) -> NodeRecord:
    return NodeRecord(
        name=row["name"], public_host=row["public_host"], state=row["state"],
        started_at=row["started_at"], heartbeat_at=row["heartbeat_at"],
        capacity=row["capacity"], dynos=row["dynos"],
        silent_for=max(0.0, float(row["silent_for"])),
    )  # fmt: skip
