"""Finding and ending the processes of dynos whose manager died (kill -9, a crash).

A dyno's process leads its own process group. The record keeps the leader's pid and
start time; the group id stays reserved by the kernel while any member lives, so:
- the leader is alive and started when recorded: its group is the dyno's, end it;
- no process has that pid: end whatever is left in the group (it can only be the dyno's);
- a process with that pid started later: the pid was reused, so the old group is empty.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path


def start_time(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot (/proc/PID/stat field 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])


def end_group(pid: int, started: int | None) -> bool:
    """SIGKILL the dyno group led by `pid` if it is still the dyno's; whether one was hit."""
    now = start_time(pid)
    if now is not None and started is not None and now != started:
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
        return True
    return False
