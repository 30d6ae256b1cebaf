"""What the store hands out (frozen records) and the errors it raises, for both backends."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.core.protocol import DynoInfo


class StoreError(Exception):
    """A request the state refuses: an unknown app, a duplicate name."""


class DynoLimitReached(StoreError):
    """The app already runs `limit` dynos (counted over every node), so no `run.N` was
    allocated."""

    def __init__(self, app: str, running: int, limit: int) -> None:
        super().__init__(f"{app} already runs {running} one-off dynos, the most allowed")
        self.app = app
        self.running = running
        self.limit = limit


class SlugCorrupt(StoreError):
    """A slug whose bytes do not match the digest recorded with its release."""


class StoreUnavailable(Exception):
    """The database cannot be reached (down, restarting, unreachable). Nothing was changed
    by the call that raised it, or its outcome is unknown; the next call tries again."""


# What a client (SSH, the heroku CLI) is told while the database cannot be reached; the
# gateway's own log gets the StoreUnavailable's message, which says why.
UNAVAILABLE_MESSAGE = "the gateway's database is unavailable; try again in a moment"


@dataclass(frozen=True)
class App:
    id: int
    name: str
    size: str
    created_at: float
    # The largest size its dynos may ask for; None: any configured size.
    max_size: str | None = None


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
    # The node (host) that runs it; "" for dynos recorded before nodes were.
    node: str = ""

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> DynoRecord:
        return cls(
            app=row["app"], name=row["name"], command=row["command"], size=row["size"],
            release_version=row["release_version"], attached=bool(row["attached"]),
            state=row["state"], created_at=row["created_at"], updated_at=row["updated_at"],
            ended_at=row["ended_at"], exit_status=row["exit_status"],
            exit_signal=row["exit_signal"], pid=row["pid"], pid_started=row["pid_started"],
            node=row["node"],
        )  # fmt: skip

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


@dataclass(frozen=True)
class NodeRecord:
    """A gateway node sharing the database, as its heartbeats tell."""

    name: str
    public_host: str
    state: str  # up, stopped (shut down cleanly), dead (silent past dead_after)
    started_at: float
    heartbeat_at: float
    capacity: int  # its max_per_host
    dynos: int  # dynos recorded as running on it
    silent_for: float  # seconds since its last heartbeat, by the database's clock


@dataclass(frozen=True)
class Notice:
    """A PostgreSQL notification: its channel and payload."""

    channel: str
    payload: str


class Listener(Protocol):
    """A connection of its own that LISTENs (PostgreSQL): readable when notices came."""

    def fileno(self) -> int: ...

    def receive(self) -> list[Notice]:
        """The notices that arrived, without waiting; StoreUnavailable if the connection
        broke (make a new listener)."""
        ...

    def close(self) -> None: ...
