"""The app log's queries: a part of the Store, in a room of its own. Appending (and, with a
shared database, telling the other nodes which rows this node added), reading, and
reading the range another node's notice names."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager

from gateway.core.applog import LogLine
from gateway.store.records import App
from gateway.store.sql import Row, Transaction

# Rows per INSERT of app log lines.
LOG_BATCH = 200


class AppLogQueries(ABC):
    """Needs of the Store what every query needs: the app, queries, transactions, and
    the node this store writes for."""

    node: str

    @abstractmethod
    def app(self, name: str) -> App: ...

    @abstractmethod
    def _query(self, sql: str, args: Sequence[object] = ()) -> list[Row]: ...

    @abstractmethod
    def _transaction(self) -> AbstractContextManager[Transaction]: ...

    def append_log(self, app: str, lines: list[LogLine], keep: int) -> None:
        """Add lines to the app's log, keeping only its newest `keep` lines. With a shared
        database the other nodes are told which rows this node added (`_log_appended`),
        so that their tails can read them."""
        if not lines:
            return
        app_id = self.app(app).id
        with self._transaction() as tx:
            ids: list[int] = []
            for start in range(0, len(lines), LOG_BATCH):
                batch = lines[start : start + LOG_BATCH]
                rows = tx.execute(
                    "INSERT INTO log_lines (app_id, at, source, dyno, message, node) VALUES "
                    + ", ".join(["(?, ?, ?, ?, ?, ?)"] * len(batch))
                    + " RETURNING id",
                    [value for line in batch
                     for value in (app_id, line.at, line.source, line.dyno, line.message,
                                   self.node)],
                ).fetchall()  # fmt: skip
                ids += [row["id"] for row in rows]
            tx.execute(
                "DELETE FROM log_lines WHERE app_id = ? AND id <= (SELECT id FROM log_lines"
                " WHERE app_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (app_id, app_id, keep),
            )
            self._log_appended(tx, app, min(ids), max(ids))

    def _log_appended(  # noqa: B027 (a hook: only a shared database has nodes to tell)
        self, tx: Transaction, app: str, first: int, last: int
    ) -> None:
        """This node added the app's log lines `first` to `last` (ids) in `tx`."""

    def read_log(self, app: str, dyno: str | None = None, lines: int = 100) -> list[LogLine]:
        """The app's last `lines` log lines (of one dyno, if given), oldest first."""
        sql = "SELECT id, at, source, dyno, message FROM log_lines WHERE app_id = ?"
        args: list[object] = [self.app(app).id]
        if dyno is not None:
            sql += " AND dyno = ?"
            args.append(dyno)
        rows = self._query(sql + " ORDER BY id DESC LIMIT ?", [*args, lines])
        return [LogLine(**row) for row in reversed(rows)]

    def log_range(self, app: str, node: str, first: int, last: int) -> list[LogLine]:
        """The lines `node` added to the app's log with ids `first` to `last` (those
        still kept), oldest first: what another node's notice names."""
        rows = self._query(
            "SELECT log_lines.id, at, source, dyno, message FROM log_lines JOIN apps ON"
            " apps.id = log_lines.app_id WHERE apps.name = ? AND log_lines.node = ?"
            " AND log_lines.id BETWEEN ? AND ? ORDER BY log_lines.id",
            (app, node, first, last),
        )
        return [LogLine(**row) for row in rows]
