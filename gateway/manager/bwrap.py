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
import logging
import os
import resource
import secrets
import shutil
import stat
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import trio

from gateway.config import DEFAULT_SIZE, Config
from gateway.core.environment import dyno_env
from gateway.manager.bwrap_args import (
    DYNO_GID,
    DYNO_UID,
    HOLDER_ROOT,
    NOFILE,
    OVERLAY_FAILED,
    ROOT_TOOLS,
    TOOLS,
    TRUSTED_PATH,
    Layout,
    StackEntry,
    bwrap_args,
    encode_args,
    find_tools,
    hidden_args,
    inner_argv,
    look_at_stack,
    overlay_safe,
    wrapper_argv,
)
from gateway.manager.dyno_init import InitBinary, InitControl
from gateway.manager.holder import Holder, HolderError
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
    Launched,
    SandboxError,
    Workspace,
    free_port,
    remove_dyno_dirs,
    start_command,
)
from gateway.manager.views import ReleaseViews, copy_release
from gateway.slugs import remove_tree

log = logging.getLogger(__name__)

# Seconds a trial dyno may take at start.
PROBE_TIMEOUT = 30.0


class BwrapUnavailable(Exception):
    """bwrap cannot run dynos here; the message says why."""


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
class _DynoResources:
    """What the sandbox holds for one prepared dyno."""

    cgroup: DynoCgroup | None = None
    holder: Holder | None = None
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
        self.views = ReleaseViews(config.state_dir / "views", config.releases_dir, tools)
        self.stack = look_at_stack(config.dynos.stack)
        self.hidden = hidden_args(self.stack, self._gateway_paths())
        self.init = init
        self._nursery: trio.Nursery | None = None
        self._dynos: dict[Path, _DynoResources] = {}

    # Choosing

    @classmethod
    async def probe(cls, config: Config, strict: bool, init: InitBinary) -> BwrapSandbox:
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
            sandbox = await cls._try(config, tools, plan, notes, strict, init)
        except BaseException:
            if cgroups is not None:
                cgroups.remove_parents()
            raise
        if cgroups is not None:
            atexit.register(cgroups.remove_parents)
        return sandbox

    @classmethod
    async def _try(
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
                await sandbox._probe()
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
        views = self.views
        self.views = ReleaseViews(probe_dir / "views", release.parent, self.tools)  # goes with it
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
            init = InitControl.open()
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
                        pass_fds=(*command.pass_fds, *init.child_fds),
                    )
            finally:
                init.close()
                with trio.CancelScope(shield=True):
                    await self.remove_workspace(workspace)
        finally:
            self.views = views
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
        dyno = self._dynos[root] = _DynoResources()
        try:
            if self.plan.cgroups is not None:
                dyno.cgroup = self.plan.cgroups.create(root.name, limits_for(size))
                dyno.cgroup.arm_oom()
                if self._nursery is not None:  # none for the trial dyno
                    self._nursery.start_soon(_end_on_oom, dyno.cgroup, root.name)
            if self.plan.root:
                await self._start_holder(spec, workspace, dyno)
            else:
                await copy_release(
                    self.tools, spec.release_dir, workspace.app, owned=self.plan.root
                )
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.remove_workspace(workspace)
            raise
        return workspace

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the dynos' memory watches for as long as the manager serves."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def start(self, spec: DynoSpec, stdio: list[int]) -> Launched:
        try:
            workspace = await self.prepare(spec)
        except (OSError, HolderError, NetworkError, ValueError, trio.TooSlowError) as exc:
            raise SandboxError(str(exc)) from None
        try:
            return start_command(lambda init: self.command(spec, workspace, init), stdio, workspace)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.remove_workspace(workspace)
            raise

    def command(self, spec: DynoSpec, workspace: Workspace, init: InitControl) -> Command:
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
        return Command(argv, env, cwd, (self.init.fd,))

    def end_reason(self, launched: Launched) -> list[str]:
        dyno = self._dynos.get(launched.workspace.root)
        if dyno is not None and dyno.cgroup is not None and dyno.cgroup.ran_out_of_memory():
            return [R15, "Stopping process with SIGKILL"]
        return []

    async def remove(self, launched: Launched) -> None:
        launched.init.close()
        await self.remove_workspace(launched.workspace)

    async def remove_workspace(self, workspace: Workspace) -> None:
        dyno = self._dynos.pop(workspace.root, None)
        if dyno is not None:
            if dyno.cgroup is not None:
                dyno.cgroup.disarm_oom()
                await dyno.cgroup.remove()
            if dyno.slirp is not None:
                await dyno.slirp.stop()
            if dyno.holder is not None:
                await dyno.holder.end()
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
        self.views.remove_stale()

    # Steps

    async def _start_holder(
        self, spec: DynoSpec, workspace: Workspace, dyno: _DynoResources
    ) -> None:
        rw = workspace.root / "rw"
        rw.mkdir()
        lower, copy = "", ""
        if self.plan.overlay:
            lower = str(await self.views.view(spec.app, spec.release_dir))
        else:
            await copy_release(self.tools, spec.release_dir, workspace.app, owned=self.plan.root)
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
        holder = dyno.holder = await Holder.start(self.tools, self.plan.network, params)
        await holder.said(b"namespaces\n")
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
                    await holder.said(b"ready\n")
                except Exception as exc:
                    failures.insert(0, exc)
            if failures:
                raise failures[0]
        else:
            await holder.said(b"ready\n")
        await holder.ready()

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
    """The dyno's OOM watch, in the sandbox's own nursery (`run`); it ends when the dyno is
    removed (`disarm_oom`)."""
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
