"""The bubblewrap sandbox: each dyno in its own namespaces, as an unprivileged user.

How a dyno is built when the manager runs as root (docs/sandbox.md has the why):

1. `prepare`: the dyno's cgroup, with its size's limits; the release's *view* (a copy
   of the read-only release owned by the dyno user, made once per release, so /app is
   writable as on Heroku); a *holder* process in a private mount namespace (and network
   namespace, for outbound) that mounts a tmpfs capped at `tmp_max_bytes`, an overlay
   of the view with its upper dir on that tmpfs (the dyno's /app), and the dyno's /tmp
   beside it. The mounts exist only in that namespace, so they go away with the last
   process in it: no mount of a dyno can outlive it in the host's table. For outbound
   networking, slirp4netns serves the holder's network namespace.
2. `command`: `nsenter` into the holder's namespaces; a small root shell joins the
   cgroup (before anything forks), sets rlimits, ignores the stop signals for itself
   and bwrap, and starts `chroot --userspec` -> `bwrap` as the dyno user; bwrap makes
   the user, pid, ipc, uts and cgroup namespaces, binds the stack read-only, /app and
   /tmp, and runs the dyno's init as PID 1 (dyno_init.c: it resets the signals, makes
   the terminal's session, reaps, and reports the command's status), which runs
   `bash -c CMD`.
3. `remove`: kills whatever is left in the cgroup, stops slirp4netns and the holder,
   removes the cgroup and the workspace.

When the manager is not root, bwrap runs as the manager's user in a user namespace,
/app is a copy, /tmp a bwrap tmpfs, and there are no cgroups (rlimits only).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import resource
import secrets
import shutil
import stat
import subprocess
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import trio

from gateway.config import DEFAULT_SIZE, Config
from gateway.core.environment import dyno_env
from gateway.manager.dyno_init import InitBinary, InitPipes
from gateway.manager.limits import (
    R15,
    Cgroups,
    CgroupsUnavailable,
    DynoCgroup,
    limits_for,
    parent_name,
)
from gateway.manager.network import NetworkError, Slirp, resolv_conf
from gateway.manager.sandbox import (
    OWN_NETWORK_PORT,
    Command,
    DynoSpec,
    Workspace,
    free_port,
    remove_dyno_dirs,
)
from gateway.slugs import remove_tree

log = logging.getLogger("gateway.manager")

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
HOLDER_READY = 10.0
PROBE_TIMEOUT = 30.0
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


class BwrapUnavailable(Exception):
    """bwrap cannot run dynos here; the message says why."""


class HolderError(Exception):
    def __init__(self, status: int | None, output: str) -> None:
        super().__init__(f"holder failed (status {status}): {output.strip() or 'no output'}")
        self.status = status


# Pure pieces


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


# The sandbox


@dataclass(frozen=True)
class Plan:
    """How dynos are built on this host: what the probe found to work."""

    root: bool  # holder namespaces, setpriv, the dyno user on the host, cgroups
    overlay: bool  # /app an overlay on the view; else a copy of the release
    network: str  # outbound | none | host
    cgroups: Cgroups | None = None
    notes: tuple[str, ...] = ()  # what is weaker than asked, for the log


@dataclass
class _Dyno:
    """What the sandbox holds for one prepared dyno."""

    cgroup: DynoCgroup | None = None
    holder: trio.Process | None = None
    holder_stdin: trio.abc.SendStream | None = None
    slirp: Slirp | None = None
    args_path: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)


class BwrapSandbox:
    name = "bwrap"

    def __init__(self, config: Config, tools: dict[str, str], plan: Plan, init: InitBinary) -> None:
        self.config = config
        self.tools = tools
        self.plan = plan
        self.shell = config.dynos.shell
        self.dynos_dir = config.dynos_dir
        self.views_dir = config.state_dir / "views"
        self.stack = look_at_stack(config.dynos.stack)
        self.hidden = hidden_args(self.stack, self._gateway_paths())
        self.init = init
        self._dynos: dict[Path, _Dyno] = {}
        self._view_locks: dict[Path, trio.Lock] = {}

    # Choosing

    @classmethod
    def probe(cls, config: Config, strict: bool, init: InitBinary) -> BwrapSandbox:
        """A bwrap sandbox that has just run a dyno here, or BwrapUnavailable.

        With `strict` (sandbox = "bwrap"), outbound networking that cannot work is an
        error; otherwise (auto) the dynos share the host's network, and the log says so."""
        root = os.geteuid() == 0
        tools, missing = find_tools(TOOLS + (ROOT_TOOLS if root else ()))
        if missing:
            raise BwrapUnavailable(
                f"not found on {TRUSTED_PATH}: {', '.join(missing)}"
                + (" (Debian: apt-get install bubblewrap)" if "bwrap" in missing else "")
            )
        notes: list[str] = []
        network = config.dynos.network
        if network == "outbound":
            problem = _outbound_problem(root, tools)
            if problem and strict:
                raise BwrapUnavailable(f'network = "outbound" cannot work: {problem}')
            if problem:
                notes.append(f"network host (outbound NAT unavailable: {problem})")
                network = "host"
        cgroups = None
        if root:
            try:
                cgroups = Cgroups.discover(parent_name(config.state_dir))
            except (CgroupsUnavailable, OSError) as exc:
                notes.append(f"no cgroup limits ({exc}): rlimits only")
        else:
            notes.append("not root: no cgroup limits, rlimits only; /app is a copy")
        plan = Plan(root, root and overlay_safe(config.state_dir), network, cgroups)
        try:
            sandbox = cls._try(config, tools, plan, notes, strict, init)
        except BaseException:
            if cgroups is not None:
                cgroups.remove_parents()
            raise
        if cgroups is not None:
            atexit.register(cgroups.remove_parents)
        return sandbox

    @classmethod
    def _try(
        cls,
        config: Config,
        tools: dict[str, str],
        plan: Plan,
        notes: list[str],
        strict: bool,
        init: InitBinary,
    ) -> BwrapSandbox:
        """Run trial dynos until one works, weakening the plan where allowed."""
        while True:
            sandbox = cls(config, tools, replace(plan, notes=tuple(notes)), init)
            try:
                _run_in_new_trio(sandbox._probe)
            except HolderError as exc:
                if exc.status != OVERLAY_FAILED or not plan.overlay:
                    raise BwrapUnavailable(str(exc)) from None
                notes.append(f"/app is a copy (overlay failed: {exc})")
                plan = replace(plan, overlay=False)
            except NetworkError as exc:
                if strict or plan.network != "outbound":
                    raise BwrapUnavailable(f'network = "outbound" cannot work: {exc}') from None
                notes.append(f"network host (outbound NAT failed: {exc})")
                plan = replace(plan, network="host")
            except BwrapUnavailable:
                raise
            except Exception as exc:
                raise BwrapUnavailable(f"{type(exc).__name__}: {exc}") from None
            else:
                return sandbox

    async def _probe(self) -> None:
        """Run a real dyno through every step: prepare, the wrapper, bwrap, remove."""
        probe_dir = self.dynos_dir / f".probe.{secrets.token_hex(4)}"
        release = probe_dir / "release"
        release.mkdir(parents=True)
        (release / "probe.txt").write_text("ok\n")
        self.views_dir = probe_dir / "views"  # the probe's view goes with it
        spec = DynoSpec(
            app="probe",
            name="probe",
            command="id -u; hostname; cat /app/probe.txt; echo changed > /app/probe.txt",
            config_vars={},
            pty=None,
            release_dir=release,
            size=DEFAULT_SIZE
            if DEFAULT_SIZE in self.config.sizes
            else next(iter(self.config.sizes)),
        )
        try:
            workspace = await self.prepare(spec)
            init = InitPipes.open()
            try:
                command = self.command(spec, workspace, init)
                with trio.fail_after(PROBE_TIMEOUT):
                    result = await trio.run_process(
                        command.argv,
                        env=command.env,
                        cwd=command.cwd,
                        stdin=subprocess.DEVNULL,
                        capture_stdout=True,
                        capture_stderr=True,
                        check=False,
                        pass_fds=command.pass_fds,
                    )
            finally:
                init.close()
                with trio.CancelScope(shield=True):
                    await self.remove(workspace)
        finally:
            self.views_dir = self.config.state_dir / "views"
            self._view_locks.clear()
            if probe_dir.exists():
                remove_tree(probe_dir)
        expected = f"{DYNO_UID}\nprobe\nok\n".encode()
        if result.returncode != 0 or result.stdout != expected:
            words = (result.stderr or result.stdout).decode(errors="replace").strip()
            raise BwrapUnavailable(
                f"a trial dyno failed (status {result.returncode}): {words or 'no output'}"
            )

    def describe(self) -> str:
        plan = self.plan
        app = "an overlay" if plan.overlay else "a copy"
        limits = plan.cgroups.describe() if plan.cgroups else "rlimits only"
        user = f"uid {DYNO_UID}" + ("" if plan.root else " (mapped to the gateway's user)")
        line = (
            "sandbox in force: bwrap (pid, mount, ipc, uts namespaces; "
            f"{user} without capabilities; /app {app} of the release; "
            f"/tmp capped at {self.config.dynos.tmp_max_bytes} bytes; "
            f"network {plan.network}; limits: {limits})"
        )
        if plan.notes:
            line += "; weaker than configured: " + "; ".join(plan.notes)
        return line

    # The Sandbox protocol

    async def prepare(self, spec: DynoSpec) -> Workspace:
        try:
            size = self.config.sizes[spec.size]
        except KeyError:
            raise ValueError(f"unknown dyno size {spec.size!r}") from None
        self.dynos_dir.mkdir(parents=True, exist_ok=True)
        root = self.dynos_dir / f"{spec.app}.{spec.name}.{secrets.token_hex(8)}"
        root.mkdir(mode=0o700)
        workspace = Workspace(root)
        dyno = self._dynos[root] = _Dyno()
        try:
            if self.plan.cgroups is not None:
                dyno.cgroup = self.plan.cgroups.create(root.name, limits_for(size))
                dyno.cgroup.arm_oom()
                trio.lowlevel.spawn_system_task(_end_on_oom, dyno.cgroup, root.name)
            if self.plan.root:
                await self._start_holder(spec, workspace, dyno)
            else:
                await self._copy_release(spec.release_dir, workspace.app)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.remove(workspace)
            raise
        return workspace

    def command(self, spec: DynoSpec, workspace: Workspace, init: InitPipes) -> Command:
        dyno = self._dynos[workspace.root]
        if self.plan.root:
            assert dyno.holder is not None
            layout = Layout(
                app=f"{HOLDER_ROOT}/app",
                tmp=f"{HOLDER_ROOT}/tmp",
                tmp_bytes=self.config.dynos.tmp_max_bytes,
                resolv_conf=dyno.extra.get("resolv_conf"),
            )
            # Written through the holder's root: its /tmp is the dyno's private tmpfs.
            args_host = Path(f"/proc/{dyno.holder.pid}/root{HOLDER_ROOT}/args")
            args_seen = f"{HOLDER_ROOT}/args"
        else:
            layout = Layout(str(workspace.app), None, self.config.dynos.tmp_max_bytes)
            args_host = workspace.root / "args"
            args_seen = str(args_host)
        shell = self._shell_path()
        args = bwrap_args(
            hostname=spec.name,
            stack=self.stack,
            hidden=self.hidden,
            layout=layout,
            network=self.plan.network,
            env=dyno_env(
                name=spec.name,
                config_vars=spec.config_vars,
                app_dir="/app",
                port=free_port() if self.plan.network == "host" else OWN_NETWORK_PORT,
                pty=spec.pty,
            ),
        )
        fd = os.open(args_host, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(encode_args(args))
        argv = wrapper_argv(
            self.tools,
            holder_pid=dyno.holder.pid if dyno.holder else None,
            network=self.plan.network,
            procs_files=[str(p) for p in dyno.cgroup.procs_files] if dyno.cgroup else [],
            inner=inner_argv(
                self.init.fd, init.init_args(ctty=spec.pty is not None), shell, spec.command
            ),
        )
        env = {"PATH": TRUSTED_PATH, "GW_ARGS": args_seen, "GW_NOFILE": str(self._nofile())}
        if dyno.cgroup is None:
            env["GW_DATA_KB"] = str(self.config.sizes[spec.size].memory * 1024)
        cwd = Path("/") if self.plan.root else workspace.root
        return Command(argv, env, cwd, (*init.child_fds, self.init.fd))

    def end_reason(self, workspace: Workspace) -> list[str]:
        dyno = self._dynos.get(workspace.root)
        if dyno is not None and dyno.cgroup is not None and dyno.cgroup.ran_out_of_memory():
            return [R15, "Stopping process with SIGKILL"]
        return []

    async def remove(self, workspace: Workspace) -> None:
        dyno = self._dynos.pop(workspace.root, None)
        if dyno is not None:
            if dyno.cgroup is not None:
                dyno.cgroup.disarm_oom()
                await dyno.cgroup.remove()
            if dyno.slirp is not None:
                await dyno.slirp.stop()
            if dyno.holder is not None:
                await _end(dyno.holder, dyno.holder_stdin)
        if workspace.root.exists():
            await trio.to_thread.run_sync(remove_tree, workspace.root)

    def remove_leftovers(self) -> None:
        """What a dead manager left: dyno cgroups (with any process still in them), dyno
        dirs, and views of releases that are gone. Its holders and slirp4netns processes
        ended with it (their pipes to the manager closed), and their mounts with them."""
        if self.plan.cgroups is not None:
            for group in self.plan.cgroups.leftovers():
                log.warning("removing a dyno cgroup left behind: %s", group.dirs[0])
                group.remove_now()
        remove_dyno_dirs(self.dynos_dir)
        self._remove_stale_views()

    # Steps

    async def _start_holder(self, spec: DynoSpec, workspace: Workspace, dyno: _Dyno) -> None:
        rw = workspace.root / "rw"
        rw.mkdir()
        lower, copy = "", ""
        if self.plan.overlay:
            lower = str(await self._view(spec.app, spec.release_dir))
        else:
            await self._copy_release(spec.release_dir, workspace.app)
            copy = str(workspace.app)
        resolv = ""
        if self.plan.network == "outbound" and _etc_resolv_is_file(self.stack):
            resolv = resolv_conf()
            dyno.extra["resolv_conf"] = f"{HOLDER_ROOT}/resolv.conf"
        params = [
            str(rw),
            str(self.config.dynos.tmp_max_bytes),
            f"{DYNO_UID}:{DYNO_GID}",
            lower,
            copy,
            resolv,
        ]
        stdin_r, stdin_w = os.pipe()
        try:
            dyno.holder = await trio.lowlevel.open_process(
                holder_argv(self.tools, self.plan.network, params),
                stdin=stdin_r,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={"PATH": TRUSTED_PATH},
                cwd="/",
            )
        except BaseException:
            os.close(stdin_w)
            raise
        finally:
            os.close(stdin_r)
        dyno.holder_stdin = trio.lowlevel.FdStream(stdin_w)
        holder = dyno.holder
        assert holder.stdout is not None
        output = b""

        async def until(line: bytes) -> None:
            nonlocal output
            with trio.move_on_after(HOLDER_READY):
                while line not in output:
                    chunk = await holder.stdout.receive_some(4096)  # type: ignore[union-attr]
                    if not chunk:
                        break
                    output += chunk
            if line not in output:
                status = holder.poll()
                if status is None:
                    with trio.move_on_after(1):
                        status = await holder.wait()
                raise HolderError(status, output.decode(errors="replace"))

        await until(b"namespaces\n")
        if self.plan.network == "outbound":
            # slirp4netns starts on the holder's netns while the holder mounts.
            failures: list[BaseException] = []

            async def slirp() -> None:
                try:
                    dyno.slirp = await Slirp.start(
                        self.tools["slirp4netns"], holder.pid, workspace.root / "slirp.log"
                    )
                except Exception as exc:
                    failures.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(slirp)
                try:
                    await until(b"ready\n")
                except Exception as exc:
                    failures.insert(0, exc)
            if failures:
                raise failures[0]
        else:
            await until(b"ready\n")
        await holder.stdout.aclose()

    async def _view(self, app: str, release_dir: Path) -> Path:
        """The release as the dyno user owns it, made once per release: overlay copies
        lower files up with their owner and mode, so a root-owned read-only release
        would leave /app read-only for the dyno."""
        info = os.stat(release_dir)
        view = self.views_dir / app / f"{release_dir.name}.{info.st_ino}"
        if view.is_dir():
            return view
        lock = self._view_locks.setdefault(view, trio.Lock())
        async with lock:
            if view.is_dir():
                return view
            self.views_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            view.parent.mkdir(mode=0o700, exist_ok=True)
            partial = view.with_name(f".{view.name}.{secrets.token_hex(4)}")
            try:
                await _run(self.tools["cp"], "-a", "--reflink=auto", f"{release_dir}/.", partial)
                await _run(self.tools["chown"], "-R", "-h", f"{DYNO_UID}:{DYNO_GID}", partial)
                await _run(self.tools["chmod"], "-R", "u+w", partial)
                partial.rename(view)
            except BaseException:
                with trio.CancelScope(shield=True):
                    if partial.exists():
                        await trio.to_thread.run_sync(remove_tree, partial)
                raise
            log.info("release view made app=%s release=%s", app, release_dir.name)
        return view

    async def _copy_release(self, release_dir: Path, target: Path) -> None:
        await _run(self.tools["cp"], "-a", "--reflink=auto", f"{release_dir}/.", target)
        if self.plan.root:
            await _run(self.tools["chown"], "-R", "-h", f"{DYNO_UID}:{DYNO_GID}", target)
        await _run(self.tools["chmod"], "-R", "u+w", target)

    def _remove_stale_views(self) -> None:
        if not self.views_dir.is_dir():
            return
        for app_dir in self.views_dir.iterdir():
            for view in app_dir.iterdir():
                version, _, ino = view.name.rpartition(".")
                release = self.config.releases_dir / app_dir.name / version
                with contextlib.suppress(FileNotFoundError):
                    if not view.name.startswith(".") and str(os.stat(release).st_ino) == ino:
                        continue
                remove_tree(view)
            with contextlib.suppress(OSError):
                app_dir.rmdir()

    def _shell_path(self) -> str:
        """bash where the stack has it, else sh, as the process sandbox chooses."""
        return f"/bin/{self.shell}" if Path("/bin", self.shell).exists() else "/bin/sh"

    def _nofile(self) -> int:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return NOFILE if hard == resource.RLIM_INFINITY else min(NOFILE, hard)

    def _gateway_paths(self) -> list[tuple[str, bool]]:
        """The gateway's own paths, hidden from dynos where a stack dir would show them."""
        paths = [(str(self.config.state_dir), True), (str(self.config.keys_dir), True)]
        if self.config.source != "<defaults>":
            paths.append((str(Path(self.config.source).resolve()), False))
        return paths


async def _end_on_oom(group: DynoCgroup, dyno: str) -> None:
    """The dyno's OOM watch: a system task, because the Sandbox protocol gives the
    sandbox no nursery; it ends when the dyno is removed (`disarm_oom`)."""
    try:
        await group.end_on_oom()
    except Exception:
        log.exception("OOM watch failed dyno=%s", dyno)
        return
    if group.oom_seen:
        log.warning("dyno out of memory, ending it dyno=%s", dyno)


def _outbound_problem(root: bool, tools: dict[str, str]) -> str | None:
    if not root:
        return "slirp4netns plumbing needs the manager to run as root"
    path = shutil.which("slirp4netns", path=TRUSTED_PATH)
    if path is None:
        return "slirp4netns not found (Debian: apt-get install slirp4netns)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    tools["slirp4netns"] = path
    return None


def _etc_resolv_is_file(stack: Sequence[StackEntry]) -> bool:
    """The dyno's resolv.conf can be replaced only where /etc is bound and the file is
    a plain file (a symlink would point outside the sandbox)."""
    return any(e.path == "/etc" and e.link is None for e in stack) and stat.S_ISREG(
        os.lstat("/etc/resolv.conf").st_mode if os.path.lexists("/etc/resolv.conf") else 0
    )


async def _run(*argv: str | Path) -> None:
    """Run a tool to completion; its stderr becomes the error."""
    result = await trio.run_process([str(a) for a in argv], capture_stderr=True, check=False)
    if result.returncode != 0:
        raise OSError(f"{Path(str(argv[0])).name} failed: {result.stderr.decode().strip()}")


async def _end(process: trio.Process, stdin: trio.abc.SendStream | None) -> None:
    """Close a helper's lifeline (it exits on EOF), kill it if it lingers, reap it."""
    if stdin is not None:
        with contextlib.suppress(trio.ClosedResourceError, OSError):
            await stdin.aclose()
    with trio.move_on_after(1):
        await process.wait()
        return
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    await process.wait()


def _run_in_new_trio(fn: Callable[[], object]) -> None:
    """Run the async `fn` to completion in a trio run of its own, on a thread: the
    probe runs before the manager serves, from a synchronous caller."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            trio.run(fn)  # type: ignore[arg-type]
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, name="bwrap-probe")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
