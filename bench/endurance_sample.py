"""What an operator would watch on a long-running gateway, read from /proc, the cgroup
tree and the state dir: one `Sample` at each of the endurance run's checkpoints."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from bench import proc
from gateway.manager.limits import group_dir, parent_name, parse_cgroup_mounts, parse_proc_cgroup


@dataclass(frozen=True)
class ProcessUse:
    """One gateway process: open descriptors, resident memory, threads, and the names
    of its child processes (all threads' children)."""

    fds: int
    rss: int
    threads: int
    children: tuple[str, ...]
    cpu: float  # seconds of CPU used so far (user and system)

    @classmethod
    def of(cls, pid: int) -> ProcessUse:
        children = []
        for child in _children(pid):
            with contextlib.suppress(OSError):
                children.append(Path(f"/proc/{child}/comm").read_text().strip())
        return cls(
            fds=len(os.listdir(f"/proc/{pid}/fd")),
            rss=proc.memory(pid).rss,
            threads=len(os.listdir(f"/proc/{pid}/task")),
            children=tuple(sorted(children)),
            cpu=proc.cpu_seconds(pid),
        )


@dataclass(frozen=True)
class Sample:
    manager: ProcessUse
    front: ProcessUse
    processes: int  # everything below the manager: the front, inits, dynos
    dyno_dirs: int  # running and prepared dynos' dirs in state_dir/dynos
    mounts: int  # the host's (the manager's) mounts of anything in state_dir
    cgroups: int  # dyno groups under the gateway's parent group (memory controller)
    db_bytes: int
    wal_bytes: int
    wal_resets: int  # the WAL header's checkpoint sequence number: +1 each time it restarts
    audit_bytes: int
    dyno_rows: int  # rows of the dynos table (the usage records)
    log_rows: int  # rows of the app log (bounded per app)

    def steady(self) -> tuple[object, ...]:
        """What must come back exactly to its value at the baseline when no session runs."""
        return (
            self.manager.fds,
            self.manager.children,
            self.front.fds,
            self.front.children,
            self.processes,
            self.dyno_dirs,
            self.mounts,
            self.cgroups,
        )


def sample(manager: int, front: int, state_dir: Path) -> Sample:
    database = state_dir / "gateway.db"
    dyno_rows, log_rows = _row_counts(database)
    return Sample(
        manager=ProcessUse.of(manager),
        front=ProcessUse.of(front),
        processes=len(proc.descendants(manager)),
        dyno_dirs=_count(state_dir / "dynos"),
        mounts=_gateway_mounts(manager, state_dir),
        cgroups=_count(dyno_cgroup_parent(manager, state_dir)),
        db_bytes=_size(database),
        wal_bytes=_size(database.with_name("gateway.db-wal")),
        wal_resets=_wal_resets(database.with_name("gateway.db-wal")),
        audit_bytes=_size(state_dir / "audit.jsonl"),
        dyno_rows=dyno_rows,
        log_rows=log_rows,
    )


def dyno_cgroup_parent(manager: int, state_dir: Path) -> Path | None:
    """The gateway's parent group in the memory hierarchy (v1) or the v2 tree: where
    each dyno's group is made (gateway/manager/limits.py)."""
    own_v1, own_v2 = parse_proc_cgroup(Path(f"/proc/{manager}/cgroup").read_text())
    mounts_v1, mount_v2 = parse_cgroup_mounts(Path(f"/proc/{manager}/mountinfo").read_text())
    name = parent_name(state_dir)
    if "memory" in own_v1 and "memory" in mounts_v1:
        own = group_dir(mounts_v1["memory"], own_v1["memory"])
    elif own_v2 is not None and mount_v2 is not None:
        own = group_dir(mount_v2, own_v2)
        if own.name == "manager":  # moved into a leaf of its own group (limits.py)
            own = own.parent
    else:
        return None
    return own / name


def _gateway_mounts(manager: int, state_dir: Path) -> int:
    """Mounts in the manager's namespace naming the state dir (as mount point, source or
    overlay layer). Other mounts on the host come and go with other programs."""
    lines = Path(f"/proc/{manager}/mountinfo").read_text().splitlines()
    return sum(str(state_dir) in line for line in lines)


def _children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return found


def _count(directory: Path | None) -> int:
    if directory is None or not directory.is_dir():
        return 0
    return sum(1 for entry in directory.iterdir() if entry.is_dir())


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _wal_resets(wal: Path) -> int:
    """Bytes 12-15 of the WAL header (sqlite.org/fileformat.html#wal_file_format): the
    checkpoint sequence number, which grows by one each time a writer starts the WAL
    over after a complete checkpoint."""
    try:
        with open(wal, "rb") as file:
            header = file.read(16)
    except FileNotFoundError:
        return 0
    return int.from_bytes(header[12:16], "big") if len(header) == 16 else 0


def _row_counts(database: Path) -> tuple[int, int]:
    """Rows of dynos and log_lines, read-only (a reader the gateway's checkpoints wait
    for only while it reads)."""
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)
    try:
        dynos = db.execute("SELECT COUNT(*) FROM dynos").fetchone()[0]
        lines = db.execute("SELECT COUNT(*) FROM log_lines").fetchone()[0]
    finally:
        db.close()
    return int(dynos), int(lines)
