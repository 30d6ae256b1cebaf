"""The stack: the host directories a dyno sees, read-only (Debian's /usr, /etc, ...), as
the host has them, and which of the gateway's own paths would show through them."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StackEntry:
    """A stack dir as the host has it: a directory, or a symlink (merged /usr)."""

    path: str
    link: str | None = None


def look_at_stack(stack: Iterable[str]) -> list[StackEntry]:
    """The configured stack dirs that exist here; missing ones are skipped."""
    entries = []
    for path in stack:
        if os.path.islink(path):
            entries.append(StackEntry(path, os.readlink(path)))
        elif os.path.isdir(path):
            entries.append(StackEntry(path))
    return entries


def hidden_paths(
    entries: Sequence[StackEntry], secrets_: Iterable[tuple[str, bool]]
) -> list[tuple[str, bool]]:
    """The gateway's own paths (state, keys, its config file: `secrets_` as (path, is_dir))
    that fall inside a bound stack dir, and so must be covered: a directory by an empty
    tmpfs, a file by /dev/null."""
    bound = [e.path.rstrip("/") for e in entries if e.link is None]
    return [
        (path, is_dir)
        for path, is_dir in secrets_
        if any(path == b or path.startswith(b + "/") for b in bound)
    ]
