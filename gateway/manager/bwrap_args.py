"""What bubblewrap is run with for a dyno, built without running anything (the tests check
it without root). gateway/manager/bwrap.py runs it. The bubblewrap sandbox is the one for
a gateway without root: bwrap makes a user namespace in which the dyno's uid (65534) is
the gateway's own user."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gateway.manager.stack import StackEntry, hidden_paths

# The dyno's uid and gid inside its user namespace (the gateway's user outside).
DYNO_UID = 65534
DYNO_GID = 65534
# Heroku's open-files limit.
NOFILE = 10000
TOOLS = ("bwrap", "sh", "cp", "chmod")

# The wrapper: the dyno's first process (its process group's leader). It sets the
# rlimits (a gateway without root has no cgroups to give), ignores the signals the
# supervisor sends to the group (the dyno's init resets them for the dyno's own
# processes), and waits for bwrap. It makes itself the host's first choice in a
# host-wide OOM, so that dynos go before the gateway (bwrap and the dyno die with it).
WRAPPER_SCRIPT = r"""ulimit -c 0 && ulimit -n "$GW_NOFILE" || exit 125
if [ -n "$GW_DATA_KB" ]; then ulimit -d "$GW_DATA_KB" || exit 125; fi
exec 4<"$GW_ARGS"
trap '' HUP INT QUIT TERM USR1 USR2 ALRM
exec 3<&0
"$@" <&3 3<&- &
exec 3<&- 4<&-
echo 1000 > /proc/self/oom_score_adj
wait $!
"""


def stack_args(entries: Sequence[StackEntry]) -> list[str]:
    """Bind each stack dir read-only; recreate symlinked ones as symlinks."""
    args: list[str] = []
    for entry in entries:
        if entry.link is not None:
            args += ["--symlink", entry.link, entry.path]
        else:
            args += ["--ro-bind", entry.path, entry.path]
    return args


def hidden_args(entries: Sequence[StackEntry], secrets_: Iterable[tuple[str, bool]]) -> list[str]:
    """bwrap's options covering the gateway's own paths inside bound stack dirs."""
    args: list[str] = []
    for path, is_dir in hidden_paths(entries, secrets_):
        args += ["--tmpfs", path] if is_dir else ["--ro-bind", "/dev/null", path]
    return args


@dataclass(frozen=True)
class Layout:
    """Where the dyno's writable pieces are."""

    app: str  # bound on /app: the dyno's own copy of the release
    tmp_bytes: int  # the size of its /tmp


def bwrap_args(
    *,
    hostname: str,
    stack: Sequence[StackEntry],
    hidden: Sequence[str],
    layout: Layout,
    network: str,
    env: dict[str, str],
) -> list[str]:
    """bwrap's options for one dyno. They go through a file (`--args`), so the config
    vars in them are not on a command line that every host user can read."""
    args = [
        "--unshare-user", "--uid", str(DYNO_UID), "--gid", str(DYNO_GID), "--disable-userns",
        "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
        "--hostname", hostname,
        "--die-with-parent",
        # The dyno's init is PID 1: bwrap's own would end the namespace with the
        # command, and with it whatever survived a hang-up.
        "--as-pid-1",
        "--cap-drop", "ALL",
    ]  # fmt: skip
    if network == "none":
        args.append("--unshare-net")
    args += stack_args(stack)
    args += hidden
    args += ["--proc", "/proc", "--dev", "/dev"]
    args += ["--size", str(layout.tmp_bytes), "--tmpfs", "/tmp"]
    args += ["--bind", layout.app, "/app", "--chdir", "/app", "--clearenv"]
    for key, value in env.items():
        args += ["--setenv", key, value]
    return args


def inner_argv(
    init_fd: int, init_args: Sequence[str], shell: str, command: str | None
) -> list[str]:
    """What bwrap runs: the dyno's init, exec'd through its descriptor (the binary lives
    in the gateway's state, out of the dyno's sight), and under it the shell."""
    argv = [shell] if command is None else [shell, "-c", command]
    return [f"/proc/self/fd/{init_fd}", *init_args, "--", *argv]


def encode_args(args: Sequence[str]) -> bytes:
    """bwrap's `--args FD` format: NUL-terminated arguments."""
    for arg in args:
        if "\0" in arg:
            raise ValueError("a dyno argument or config var holds a NUL byte")
    return b"".join(os.fsencode(arg) + b"\0" for arg in args)


def wrapper_argv(tools: dict[str, str], inner: Sequence[str]) -> list[str]:
    """The dyno's argv: sh WRAPPER bwrap --args 4 -- INNER (the dyno's init, in INNER,
    gives a terminal session its controlling terminal)."""
    return [tools["sh"], "-c", WRAPPER_SCRIPT, "dyno", tools["bwrap"], "--args", "4", "--", *inner]
