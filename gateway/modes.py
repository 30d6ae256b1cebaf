"""The gateway's state is private whatever the umask: state_dir and keys_dir 0700, and
every file the gateway makes under them 0600 (0700 for directories).

Every `gateway` process sets the umask below before it writes anything, so a file made
anywhere (SQLite's -wal and -shm, a release, the audit trail) has no bits for group or
others; `serve` also takes them off the two roots and the database made by an older
version, and `gateway check` fails on any it finds. The one exception is the dyno init
binary (0711): a bubblewrap dyno's own user runs it.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_UMASK = 0o077
# Bits nobody but the owner may have: any on a directory (execute lets others reach
# what is inside by name), read and write on a file (the init binary keeps execute).
DIR_OTHERS = 0o077
FILE_OTHERS = 0o066


def private_umask() -> None:
    """From here on, what this process makes is its own user's alone."""
    os.umask(PRIVATE_UMASK)


def make_private_dir(path: Path) -> None:
    """`path` (and missing parents) as a directory only its owner can enter; an existing
    one with bits for group or others loses them, said in the log."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    tighten(path)


def tighten(path: Path) -> None:
    """Take group and other bits off `path`, if it exists and has any."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if mode & 0o077:
        os.chmod(path, mode & 0o700)
        log.warning("mode of %s was %04o, now %04o", path, mode, mode & 0o700)


def loose(path: Path) -> str | None:
    """What is wrong with `path`'s mode (group or others may enter it, read it or write
    it), or None (also when it does not exist)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    mode = stat.S_IMODE(info.st_mode)
    if mode & (DIR_OTHERS if stat.S_ISDIR(info.st_mode) else FILE_OTHERS):
        return f"{path}: mode {mode:04o} lets other users in (chmod go-rwx {path})"
    return None
