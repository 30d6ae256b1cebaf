"""What the dyno's init builds in the namespaces sandbox (dyno_init.c, sandbox mode): one
spec per dyno, written as NUL-terminated words, built here without running anything."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.manager.stack import StackEntry
from gateway.manager.veth import Link

# Heroku's open-files limit.
NOFILE = 10000


@dataclass(frozen=True)
class NamespaceSpec:
    uid: int  # the app's own uid and gid (never root, never a host user's)
    gid: int
    root: Path  # an empty host dir the dyno's root is built on
    budget: int  # bytes /app's changes, /tmp and /dev/shm may take together
    lower: Path | None  # the release, /app's read-only lower layer
    own_network: bool  # a network namespace of its own (else the host's)
    veth: Link | None = None  # its pair out, made by the init (with own_network)
    cgroup_procs: tuple[str, ...] = ()  # cgroup.procs files the dyno joins
    stack: tuple[StackEntry, ...] = ()
    hidden: tuple[tuple[str, bool], ...] = ()  # (path, is_dir) covered inside the stack
    files: tuple[tuple[str, str], ...] = ()  # (path in the dyno, text): resolv.conf
    nofile: int = NOFILE
    data_bytes: int | None = None  # RLIMIT_DATA where no memory cgroup caps the dyno


def spec_words(spec: NamespaceSpec) -> list[str]:
    words = [
        "uid", str(spec.uid), "gid", str(spec.gid), "root", str(spec.root),
        "budget", str(spec.budget), "net", "own" if spec.own_network else "host",
    ]  # fmt: skip
    if spec.veth is not None:
        words += ["veth", spec.veth.host_name, spec.veth.host_address, spec.veth.dyno_address]
    if spec.lower is not None:
        words += ["lower", str(spec.lower)]
    for procs in spec.cgroup_procs:
        words += ["cgroup", procs]
    for entry in spec.stack:
        if entry.link is not None:
            words += ["symlink", entry.link, entry.path]
        else:
            words += ["ro", entry.path]
    for path, is_dir in spec.hidden:
        words += ["hide-dir" if is_dir else "hide-file", path]
    for path, text in spec.files:
        words += ["file", path, text]
    words += ["rlimit", "NOFILE", str(spec.nofile), str(spec.nofile)]
    words += ["rlimit", "CORE", "0", "0"]
    if spec.data_bytes is not None:
        words += ["rlimit", "DATA", str(spec.data_bytes), str(spec.data_bytes)]
    return words


def encode_words(words: Sequence[str]) -> bytes:
    """The init's format: each word NUL-terminated. A NUL inside a word is refused."""
    for word in words:
        if "\0" in word:
            raise ValueError("a sandbox spec word holds a NUL byte")
    return b"".join(os.fsencode(word) + b"\0" for word in words)


def account_files(
    passwd: str, group: str, uid: int, gid: int, shell: str
) -> tuple[tuple[str, str], ...]:
    """/etc/passwd and /etc/group for a dyno: the host's (its `ls -l` names the stack's
    owners) and a line for the app's own user, `uNNN` (as Heroku names a dyno's user)
    with its home at /app: programs that look their user up (sftp-server, ssh, a shell's
    prompt) find it."""
    name = f"u{uid}"

    def ended(text: str) -> str:
        return text if not text or text.endswith("\n") else text + "\n"

    return (
        ("/etc/passwd", f"{ended(passwd)}{name}:x:{uid}:{gid}::/app:{shell}\n"),
        ("/etc/group", f"{ended(group)}{name}:x:{gid}:\n"),
    )
