"""What the shared queries (base.py) see of a backend: rows, cursors, transactions, and
the two steps by which a new release's slug is kept."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

Row = Mapping[str, Any]


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Transaction(Protocol):
    """One open transaction: statements in the shared SQL, `?` placeholders."""

    def execute(self, sql: str, args: Sequence[object] = ()) -> Cursor: ...

    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None: ...


class SlugKeeper:
    """Keeps a new release's slug, in two steps of the release's transaction."""

    def store(self, tx: Transaction) -> None:
        """Before vN is allocated (and the app locked): the slow part, if it is here."""

    def place(self, version: int) -> None:
        """Once vN is allocated, before the transaction commits."""
