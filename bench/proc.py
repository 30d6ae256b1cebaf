"""Process memory, CPU time and process trees, read from /proc (Linux only)."""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Memory:
    """Resident set size and proportional set size (shared pages divided among their
    users), in bytes."""

    rss: int = 0
    pss: int = 0

    def __add__(self, other: Memory) -> Memory:
        return Memory(self.rss + other.rss, self.pss + other.pss)


def memory(pid: int) -> Memory:
    """RSS and PSS of one process; zero if it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return Memory()
    fields = {}
    for line in text.splitlines()[1:]:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[name] = int(parts[0]) * 1024
    return Memory(fields.get("Rss", 0), fields.get("Pss", 0))


def total(pids: list[int]) -> Memory:
    result = Memory()
    for pid in pids:
        result += memory(pid)
    return result


def cpu_seconds(pid: int, reaped: bool = False) -> float:
    """utime + stime of /proc/PID/stat (fields 14 and 15, in clock ticks), and with
    `reaped` its reaped children's too (16 and 17). OSError if it is gone."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11 : 15 if reaped else 13]) / os.sysconf("SC_CLK_TCK")


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def parents() -> dict[int, int]:
    """pid -> parent pid for every process on the machine."""
    result = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # The command name (field 2) may hold spaces; the fields after it do not.
        after = stat.rsplit(")", 1)[1].split()
        result[int(entry.name)] = int(after[1])
    return result


def children() -> dict[int, list[int]]:
    """pid -> its children's pids, for every process on the machine."""
    found: dict[int, list[int]] = {}
    for child, parent in parents().items():
        found.setdefault(parent, []).append(child)
    return found


def descendants(pid: int, tree: dict[int, list[int]] | None = None) -> list[int]:
    """Every process below `pid` (not `pid` itself), from `tree` (a snapshot of
    `children()`) or a new one."""
    tree = children() if tree is None else tree
    found, todo = [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def raise_fd_limit(wanted: int = 65536) -> int:
    """Raise this process's open-file limit towards `wanted` (the hard limit too, where
    allowed); returns the new soft limit. Children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            pass  # no CAP_SYS_RESOURCE (a container): the hard limit is the ceiling
    new = max(soft, wanted if hard == resource.RLIM_INFINITY else hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return new
