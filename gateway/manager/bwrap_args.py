"""What bubblewrap and its helpers are run with: argv and scripts, built without running
anything (the tests check them without root). gateway/manager/bwrap.py runs them."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

# The dyno user: `nobody`, inside the sandbox and on the host.
DYNO_UID = 65534
DYNO_GID = 65534
# Heroku's open-files limit.
NOFILE = 10000
# Where the gateway looks for the tools it runs as root: never a dyno's PATH.
TRUSTED_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TOOLS = ("bwrap", "sh", "cp", "chmod")
ROOT_TOOLS = ("chroot", "nsenter", "unshare", "mount", "install", "chown")
# Inside the holder's mount namespace the dyno's tmpfs is moved to /tmp.
HOLDER_ROOT = "/tmp"
# The holder's exit status when the overlay mount fails (the probe then tries a copy).
OVERLAY_FAILED = 3

# The holder: run by `unshare --mount --propagation private [--net]` as root. It says
# "namespaces" (slirp4netns can start on its netns meanwhile), builds the dyno's
# filesystem in its private mount namespace, says "ready", and keeps the namespaces
# alive until its stdin closes (the manager removes the dyno, or dies).
HOLDER_SCRIPT = r"""set -e
rw=$1 size=$2 owner=$3 lower=$4 copy=$5 resolv=$6
echo namespaces
mount -t tmpfs -o "size=$size,mode=0755,nosuid,nodev" dyno "$rw"
install -d -o "${owner%:*}" -g "${owner#*:}" "$rw/upper" "$rw/work" "$rw/tmp" "$rw/app"
if [ -n "$lower" ]; then
    mount -t overlay -o "lowerdir=$lower,upperdir=$rw/upper,workdir=$rw/work,nosuid,nodev" \
        overlay "$rw/app" || exit 3
else
    mount --bind "$copy" "$rw/app"
fi
if [ -n "$resolv" ]; then printf '%s' "$resolv" > "$rw/resolv.conf"; fi
mount --move "$rw" /tmp
echo ready
read -r _ || true
"""

# The wrapper: the dyno's first process (its process group and session leader). It
# joins the cgroup before anything forks, sets the rlimits, ignores the signals the
# supervisor sends to the group (the dyno's own processes get them back at default
# through `env --default-signal`) and waits for bwrap. It makes itself the host's first
# choice in a host-wide OOM, so that dynos go before the gateway (bwrap and the dyno die
# with the wrapper).
WRAPPER_SCRIPT = r"""for file do
    shift
    [ "$file" = -- ] && break
    echo $$ > "$file" || exit 125
done
ulimit -c 0 && ulimit -n "$GW_NOFILE" || exit 125
if [ -n "$GW_DATA_KB" ]; then ulimit -d "$GW_DATA_KB" || exit 125; fi
exec 4<"$GW_ARGS"
trap '' HUP INT QUIT TERM USR1 USR2 ALRM
exec 3<&0
"$@" <&3 3<&- &
exec 3<&- 4<&-
echo 1000 > /proc/self/oom_score_adj
wait $!
"""


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
    """Cover the gateway's own paths that fall inside a bound stack dir: an empty tmpfs
    over a directory, /dev/null over a file. `secrets_` are (path, is_dir)."""
    bound = [e.path.rstrip("/") for e in entries if e.link is None]
    args: list[str] = []
    for path, is_dir in secrets_:
        if any(path == b or path.startswith(b + "/") for b in bound):
            args += ["--tmpfs", path] if is_dir else ["--ro-bind", "/dev/null", path]
    return args


@dataclass(frozen=True)
class Layout:
    """Where the dyno's pieces are, as bwrap (in the holder's namespaces) sees them."""

    app: str  # bound on /app
    tmp: str | None  # bound on /tmp; None: a bwrap tmpfs of tmp_bytes
    tmp_bytes: int
    resolv_conf: str | None = None  # bound on /etc/resolv.conf


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
    if layout.resolv_conf is not None:
        args += ["--ro-bind", layout.resolv_conf, "/etc/resolv.conf"]
    args += ["--proc", "/proc", "--dev", "/dev"]
    if layout.tmp is not None:
        args += ["--bind", layout.tmp, "/tmp"]
    else:
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


def holder_argv(tools: dict[str, str], network: str, params: Sequence[str]) -> list[str]:
    namespaces = ["--mount", "--propagation", "private"]
    if network == "outbound":
        namespaces.append("--net")
    return [
        tools["unshare"],
        *namespaces,
        "--",
        tools["sh"],
        "-c",
        HOLDER_SCRIPT,
        "holder",
        *params,
    ]


def wrapper_argv(
    tools: dict[str, str],
    *,
    holder_pid: int | None,
    network: str,
    procs_files: Sequence[str],
    inner: Sequence[str],
) -> list[str]:
    """The dyno's argv: [nsenter into the holder] sh WRAPPER procs --
    [chroot --userspec: the dyno user] bwrap --args 4 -- INNER. The dyno's init (in
    INNER) gives a terminal session its controlling terminal."""
    argv: list[str] = []
    if holder_pid is not None:
        argv += [tools["nsenter"], f"--target={holder_pid}", "--mount"]
        if network == "outbound":
            argv.append("--net")
        argv.append("--")
    argv += [tools["sh"], "-c", WRAPPER_SCRIPT, "dyno", *procs_files, "--"]
    if holder_pid is not None:
        # chroot to / only to change user: it sets the groups, gid and uid, and starts
        # in a third of the time setpriv takes.
        argv += [
            tools["chroot"],
            f"--userspec={DYNO_UID}:{DYNO_GID}",
            f"--groups={DYNO_GID}",
            "--skip-chdir",
            "/",
        ]
    return [*argv, tools["bwrap"], "--args", "4", "--", *inner]


def overlay_safe(path: Path) -> bool:
    """overlayfs options cannot carry these characters in a layer path."""
    return not any(c in str(path) for c in ",:\\\n")


def find_tools(names: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Absolute paths of `names` on TRUSTED_PATH, and the names not found."""
    found, missing = {}, []
    for name in names:
        path = shutil.which(name, path=TRUSTED_PATH)
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    return found, missing
