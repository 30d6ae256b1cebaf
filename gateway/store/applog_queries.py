"""The app log's queries: a part of the Store, in a room of its own."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager

from gateway.core.applog import LogLine
from gateway.store.records import App
from gateway.store.sql import Row, Transaction


class AppLogQueries(ABC):
    """Needs of the Store what every query needs: the app, queries, transactions."""

    @abstractmethod
    def app(self, name: str) -> App: ...

    @abstractmethod
    def _query(self, sql: str, args: Sequence[object] = ()) -> list[Row]: ...

    @abstractmethod
    def _transaction(self) -> AbstractContextManager[Transaction]: ...

    def append_log(self, app: str, lines: list[LogLine], keep: int) -> None:
        """Add lines to the app's log, keeping only its newest `keep` lines."""
        if not lines:
            return
        app_id = self.app(app).id
        with self._transaction() as tx:
            tx.executemany(
                "INSERT INTO log_lines (app_id, at, source, dyno, message) VALUES (?, ?, ?, ?, ?)",
                [(app_id, line.at, line.source, line.dyno, line.message) for line in lines],
            )
            tx.execute(
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
        rows = self._query(sql + " ORDER BY id DESC LIMIT ?", [*args, lines])
        return [LogLine(**row) for row in reversed(rows)]
