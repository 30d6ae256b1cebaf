"""Usage records past their keeping: a part of the Store, in a room of its own.

Every dyno leaves one row in `dynos` (its usage: size, start, end); nothing else ever
removes it. `gateway usage:prune` pages through the rows of dynos that ended before a
time, exports them, and only then deletes exactly those rows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager

from gateway.store.records import DynoRecord
from gateway.store.sql import Row, Transaction

# Rows per page and per DELETE: well under SQLite's smallest limit on parameters (999).
PRUNE_PAGE = 500


class UsageQueries(ABC):
    """Needs of the Store what every query needs: queries and transactions."""

    @abstractmethod
    def _query(self, sql: str, args: Sequence[object] = ()) -> list[Row]: ...

    @abstractmethod
    def _transaction(self) -> AbstractContextManager[Transaction]: ...

    def ended_before(
        self, before: float, after_id: int = 0, limit: int = PRUNE_PAGE
    ) -> list[tuple[int, DynoRecord]]:
        """One page of the dynos that ended before the time `before`: their row ids (all
        above `after_id`, ascending) and records, at most `limit`."""
        rows = self._query(
            "SELECT apps.name AS app, dynos.* FROM dynos JOIN apps ON apps.id = dynos.app_id"
            " WHERE dynos.ended_at IS NOT NULL AND dynos.ended_at < ? AND dynos.id > ?"
            " ORDER BY dynos.id LIMIT ?",
            (before, after_id, limit),
        )
        return [(int(row["id"]), DynoRecord.from_row(row)) for row in rows]

    def delete_ended(self, ids: Sequence[int]) -> int:
        """Delete the rows `ids` of ended dynos (a running dyno's row stays, whatever is
        asked); how many went."""
        if not ids:
            return 0
        marks = ", ".join("?" * len(ids))
        with self._transaction() as tx:
            cursor = tx.execute(
                f"DELETE FROM dynos WHERE ended_at IS NOT NULL AND id IN ({marks})", ids
            )
            return int(cursor.rowcount)
