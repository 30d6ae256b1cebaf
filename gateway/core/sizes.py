"""Dyno sizes as the operator allows them: which sizes an app may ask for, which fit this
host at all, and what all dynos together may take of it (the gateway's parent cgroup).
Pure: the host's figures are passed in."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol


class Size(Protocol):
    @property
    def memory(self) -> int:
        """MB."""
        ...

    @property
    def pids(self) -> int: ...

    @property
    def cpu(self) -> float:
        """Cores."""
        ...


def larger(a: Size, b: Size) -> bool:
    """Whether `a` asks more of the host than `b` in any way."""
    return a.memory > b.memory or a.pids > b.pids or a.cpu > b.cpu


def refusal(sizes: Mapping[str, Size], asked: str, cap: str | None, app: str) -> str | None:
    """Why `app` may not run a dyno of size `asked` under its cap (None: it may)."""
    if asked not in sizes:
        return f"unknown dyno size {asked!r}: choose one of {', '.join(sizes)}"
    if cap and cap in sizes and larger(sizes[asked], sizes[cap]):
        allowed = [name for name, size in sizes.items() if not larger(size, sizes[cap])]
        return (
            f"{app} may not use {asked} dynos (the largest it may use is {cap}: "
            f"{', '.join(allowed)}); the operator decides, with "
            f"`gateway apps:update {app} --max-size SIZE`"
        )
    return None


@dataclass(frozen=True)
class Host:
    memory: int  # MB
    pids: int  # the kernel's pid_max
    cpus: int


def oversized(sizes: Mapping[str, Size], host: Host) -> list[str]:
    """The sizes no dyno of could get on this host, each with why."""
    found = []
    for name, size in sizes.items():
        why = []
        if size.memory > host.memory:
            why.append(f"{size.memory} MB of memory, the host has {host.memory}")
        if size.pids > host.pids:
            why.append(f"{size.pids} processes, the host allows {host.pids}")
        if size.cpu > host.cpus:
            why.append(f"{size.cpu:g} CPUs, the host has {host.cpus}")
        if why:
            found.append(f"{name}: " + "; ".join(why))
    return found


def all_dynos_cap(host: Host, reserve_mb: int, reserve_pids: int) -> tuple[int, int]:
    """(memory bytes, processes) all dynos together may take: the host's, less what the
    gateway and the host keep for themselves."""
    memory_mb = max(host.memory - reserve_mb, host.memory // 2)
    pids = max(host.pids - reserve_pids, host.pids // 2)
    return memory_mb * 1024 * 1024, pids
