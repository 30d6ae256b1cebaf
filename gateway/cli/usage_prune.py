"""`gateway usage:prune`: keep the usage records (one row per dyno, growing with every
session) to the last DAYS days, exporting what goes first."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from gateway.cli.registry import UserError, _audit, _store, _when, command
from gateway.config import Config
from gateway.store import DynoRecord, Store

DAY = 86400
MOST_DAYS = 36500  # a hundred years: more is a mistake, not a retention period


def parse_days(text: str) -> int:
    """`--before`'s value: whole days, 0 or more (0: every dyno that has ended)."""
    try:
        days = int(text.strip())
    except ValueError:
        days = -1
    if not 0 <= days <= MOST_DAYS:
        raise UserError(
            f"--before takes a whole number of days from 0 to {MOST_DAYS} "
            f"(usage:prune --before 90), not {text!r}; nothing was pruned"
        )
    return days


def export_line(record: DynoRecord) -> str:
    """One pruned dyno as a JSON line: what `gateway usage` counted of it, and how it ended."""
    assert record.ended_at is not None  # only ended dynos are pruned
    return json.dumps(
        {
            "app": record.app,
            "dyno": record.name,
            "size": record.size,
            "seconds": round(record.ended_at - record.created_at, 3),
            "created_at": _when(record.created_at),
            "ended_at": _when(record.ended_at),
            "command": record.command,
            "release": record.release_version,
            "attached": record.attached,
            "state": record.state,
            "exit_status": record.exit_status,
            "exit_signal": record.exit_signal,
            "node": record.node,
        },
        sort_keys=True,
    )


def _pages(store: Store, before: float) -> Iterator[list[tuple[int, DynoRecord]]]:
    after = 0
    while page := store.ended_before(before, after):
        yield page
        after = page[-1][0]


def _append(path: Path, pages: Iterator[list[tuple[int, DynoRecord]]]) -> list[list[int]]:
    """Append every page to `path` as JSON lines and sync it to disk; the pages' row
    ids. If anything fails, the file is cut back to what it held (UserError says why
    when it was the file)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror}; nothing was pruned") from None
    written: list[list[int]] = []
    try:
        held = os.fstat(fd).st_size
        try:
            for page in pages:
                data = "".join(export_line(record) + "\n" for _, record in page).encode()
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                written.append([row_id for row_id, _ in page])
            os.fsync(fd)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, held)
            if isinstance(exc, OSError):
                raise UserError(
                    f"cannot write {path}: {exc.strerror}; nothing was pruned"
                ) from None
            raise
    finally:
        os.close(fd)
    return written


@command(
    "usage:prune",
    "delete the usage records of dynos that ended more than DAYS days ago (after "
    "--export FILE has them)",
    lambda p: p.add_argument(
        "--before", required=True, metavar="DAYS", help="keep the last DAYS days (0: keep none)"
    ),
    lambda p: p.add_argument(
        "--export",
        type=Path,
        metavar="FILE",
        help="append the records to FILE as JSON lines first; if that fails, nothing is deleted",
    ),
)
def usage_prune(args: argparse.Namespace, config: Config) -> int:
    before = time.time() - parse_days(args.before) * DAY
    store = _store(config)
    if args.export is not None:
        pages = _append(args.export, _pages(store, before))
    else:
        pages = [[row_id for row_id, _ in page] for page in _pages(store, before)]
    pruned = sum(store.delete_ended(ids) for ids in pages)
    export = str(args.export) if args.export is not None else None
    _audit(config, "usage_pruned", before=_when(before), dynos=pruned, export=export)
    where = f"; exported to {args.export}" if args.export is not None else ""
    print(f"Pruned the usage records of {pruned} dynos that ended before {_when(before)}{where}")
    return 0
