"""The front's user, and how the front gives up root (OpenSSH's privilege separation).

Started as root, the front becomes `[front] user` before it touches anything from the
network: no supplementary groups, no capabilities (the bounding and ambient sets too, so
nothing it execs could regain any), no_new_privs (no setuid or file capabilities either),
then the syscall filter (gateway/seccomp.py). What it needs from root it was handed first
or asks the manager for (docs/security.md). Started as any other user, both processes
run as that user and only no_new_privs and the filter apply.
"""

from __future__ import annotations

import ctypes
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from gateway.config import Config

PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
CAP_LAST_CAP = Path("/proc/sys/kernel/cap_last_cap")


class PrivilegeError(Exception):
    """The front cannot run as configured; the message says what to do."""


@dataclass(frozen=True)
class FrontUser:
    name: str
    uid: int
    gid: int


def front_user(config: Config) -> FrontUser | None:
    """The user the front becomes: `[front] user` when we are root, None otherwise (it
    stays whoever started it). PrivilegeError, with how to create it, if it is missing."""
    if os.geteuid() != 0:
        return None
    name = config.front.user
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise PrivilegeError(
            f"the front's user {name!r} ([front] user) does not exist; create it with: "
            f"useradd --system --no-create-home --shell /usr/sbin/nologin {name}"
        ) from None
    if entry.pw_uid == 0:
        raise PrivilegeError(f"the front's user {name!r} ([front] user) has uid 0")
    return FrontUser(name, entry.pw_uid, entry.pw_gid)


def _prctl(option: int, arg: int = 0) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong]  # fmt: skip
    result: int = libc.prctl(option, arg, 0, 0, 0)
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option}): {os.strerror(errno)}")
    return result


def drop_privileges(user: FrontUser | None) -> None:
    """Become `user` for good (None: stay who we are), then set no_new_privs."""
    if user is not None:
        for cap in range(int(CAP_LAST_CAP.read_text()) + 1):
            _prctl(PR_CAPBSET_DROP, cap)
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
        os.setgroups([])
        os.setresgid(user.gid, user.gid, user.gid)
        # From uid 0 to another, the kernel clears the permitted and effective sets.
        os.setresuid(user.uid, user.uid, user.uid)
        os.chdir("/")
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    if user is not None:
        _check_dropped()


def _check_dropped() -> None:
    """Refuse to go on unless root is out of reach: a failed drop must not serve."""
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise PrivilegeError("the front could take uid 0 back after dropping it")
    status = Path("/proc/self/status").read_text().splitlines()
    caps = {k: v.strip() for k, _, v in (line.partition(":") for line in status)}
    held = [name for name in ("CapPrm", "CapEff", "CapBnd", "CapAmb") if int(caps[name], 16)]
    if held:
        raise PrivilegeError(f"the front still holds capabilities: {', '.join(held)}")
