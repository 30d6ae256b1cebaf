"""The namespaces sandbox, the default as root: each dyno in namespaces its own init builds
(dyno_init.c, sandbox mode), as its app's own uid, with kernel networking, made ahead of
its session so that starting one is a single message. docs/sandbox.md has the why.

Per dyno, one process beside its own: the init, PID 1 of the dyno's PID namespace and a
child of the manager. Its mount namespace holds a read-only root of the stack, /app as
an overlay of the release (owned by the app's uid, so no copy of it is made), and one
tmpfs for everything the dyno may write (/app's changes, /tmp, /dev/shm), capped at
`tmp_max_bytes`. Its cgroup carries the size's limits; its network namespace a veth
pair (gateway/manager/veth.py). Prepared sandboxes wait in a pool
(gateway/manager/prepared.py): each is handed out once, and discarded when unused.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

import trio

from gateway.config import DEFAULT_SIZE, Config
from gateway.core.environment import dyno_env
from gateway.core.sizes import all_dynos_cap
from gateway.manager.dyno_init import InitBinary, InitControl, InitError
from gateway.manager.limits import (
    R15,
    Cgroups,
    CgroupsUnavailable,
    DynoCgroup,
    host_figures,
    limits_for,
    parent_name,
)
from gateway.manager.namespace_spec import (
    NamespaceSpec,
    account_files,
    encode_words,
    spec_words,
)
from gateway.manager.prepared import PreparedPool
from gateway.manager.sandbox import (
    OWN_NETWORK_PORT,
    DynoSpec,
    Inside,
    Launched,
    SandboxError,
    Workspace,
    free_port,
    remove_dyno_dirs,
)
from gateway.manager.spawn import TRUSTED_PATH, Child, find_tools, spawn
from gateway.manager.stack import StackEntry, hidden_paths, look_at_stack
from gateway.manager.veth import Link, NetworkError, VethNetwork, upstream_resolv_conf
from gateway.slugs import own_tree, owned_by, remove_tree

log = logging.getLogger(__name__)

# Tools the sandbox runs as root; looked up on TRUSTED_PATH, never a dyno's.
TOOLS = ("ip", "nft")
READY_TIMEOUT = 10.0


class NamespacesUnavailable(Exception):
    """The namespaces sandbox cannot work here; the message says why."""


@dataclass(frozen=True)
class Recipe:
    """What a prepared sandbox is made for: the pool's key."""

    app: str
    uid: int
    release_dir: Path
    size: str


@dataclass
class Prepared:
    """A sandbox whose init waits for its start message."""

    recipe: Recipe
    process: Child | None  # None until the init said its pid
    init: InitControl
    workspace: Workspace
    cgroup: DynoCgroup | None
    link: Link | None


class NamespaceSandbox:
    name = "namespaces"

    def __init__(
        self,
        config: Config,
        init: InitBinary,
        tools: dict[str, str],
        cgroups: Cgroups | None,
        network: VethNetwork | None,
        notes: tuple[str, ...] = (),
    ) -> None:
        self.config = config
        self.init_binary = init
        self.tools = tools
        self.cgroups = cgroups
        self.network = network
        self.notes = notes
        self.shell = config.dynos.shell
        self.dynos_dir = config.dynos_dir
        self.stack = tuple(look_at_stack(config.dynos.stack))
        self.hidden = tuple(hidden_paths(list(self.stack), _gateway_paths(config)))
        self.resolv = _resolv_conf(self.stack) if network is not None else None
        self.accounts = _host_accounts(self.stack)
        self.pool: PreparedPool[Recipe, Prepared] = PreparedPool(
            self._prepare,
            self._discard,
            group=lambda recipe: (recipe.app, recipe.size),
            per_key=config.dynos.prepared,
            max_total=config.dynos.prepared_max,
            idle=config.dynos.prepared_idle,
        )
        self._running: dict[Path, Prepared] = {}
        self._nursery: trio.Nursery | None = None

    # -- choosing ----------------------------------------------------------------------

    @classmethod
    async def probe(cls, config: Config, init: InitBinary, strict: bool) -> NamespaceSandbox:
        """A sandbox that has just run a trial dyno here, or NamespacesUnavailable. Only
        the known reasons why it cannot work are caught: anything else is a bug, and
        fails loudly."""
        if os.geteuid() != 0:
            raise NamespacesUnavailable("the gateway does not run as root")
        tools, missing = find_tools(TOOLS)
        notes: list[str] = []
        network: VethNetwork | None = None
        if config.dynos.network == "outbound":
            if missing:
                problem = f"not found on {TRUSTED_PATH}: {', '.join(missing)}"
                if strict:
                    raise NamespacesUnavailable(f'network = "outbound" cannot work: {problem}')
                notes.append(f"network host (kernel NAT unavailable: {problem})")
            else:
                network = VethNetwork(tools, config.state_dir, config.dynos.subnet)
                try:
                    network.install()
                except NetworkError as exc:
                    if strict:
                        raise NamespacesUnavailable(f'network = "outbound": {exc}') from None
                    notes.append(f"network host (kernel NAT unavailable: {exc})")
                    network = None
        cgroups = None
        try:
            cgroups = Cgroups.discover(_parent_group(config))
            memory, pids = all_dynos_cap(
                host_figures(), config.dynos.host_reserve_memory, config.dynos.host_reserve_pids
            )
            cgroups.cap_all(memory, pids)
        except (CgroupsUnavailable, OSError) as exc:
            notes.append(f"no cgroup limits ({exc}): rlimits only")
        sandbox = cls(config, init, tools, cgroups, network, tuple(notes))
        try:
            await sandbox._trial()
        except (InitError, SandboxError) as exc:
            sandbox.close()
            raise NamespacesUnavailable(f"a trial dyno failed: {exc}") from None
        except BaseException:
            sandbox.close()
            raise
        return sandbox

    def describe(self) -> str:
        limits = self.cgroups.describe() if self.cgroups else "rlimits only"
        network = "outbound through kernel NAT" if self.network else self._network_mode()
        line = (
            "sandbox in force: namespaces (pid, mount, ipc, uts, cgroup, net namespaces; "
            "each app its own uid, no capabilities; /app an overlay of the release; "
            f"{self.config.dynos.tmp_max_bytes} bytes writable in all; network {network}; "
            f"{self.config.dynos.prepared} prepared per app and release; limits: {limits})"
        )
        if self.notes:
            line += "; weaker than configured: " + "; ".join(self.notes)
        return line

    def close(self) -> None:
        """At the manager's end: the network table and the cgroup parents go."""
        if self.network is not None:
            self.network.uninstall()
        if self.cgroups is not None:
            self.cgroups.remove_parents()

    # -- the Sandbox protocol ----------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The pool and the dynos' memory watches, for as long as the manager serves."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.pool.run)
                task_status.started()
        finally:
            self._nursery = None
            self.close()

    async def start(self, spec: DynoSpec, stdio: list[int]) -> Launched:
        if spec.uid is None:
            raise SandboxError("the namespaces sandbox needs the app's uid")
        recipe = Recipe(spec.app, spec.uid, spec.release_dir, spec.size)
        prepared = self.pool.take(recipe)
        self.pool.want(recipe)
        own_net = self.config.dynos.network != "host" and (
            self.network is not None or self.config.dynos.network == "none"
        )
        env = dyno_env(
            name=spec.name,
            config_vars=spec.config_vars,
            app_dir="/app",
            port=OWN_NETWORK_PORT if own_net else free_port(),
            pty=spec.pty,
        )
        shell = self._shell_path()
        argv = [shell] if spec.command is None else [shell, "-c", spec.command]
        while True:
            pooled = prepared is not None
            if prepared is None:
                try:
                    prepared = await self._prepare(recipe)
                except (InitError, NetworkError, OSError, trio.TooSlowError) as exc:
                    raise SandboxError(f"the sandbox could not be made: {exc}") from None
            try:
                prepared.init.start(spec.name, spec.pty is not None, argv, env, stdio)
                break
            except OSError as exc:
                with trio.CancelScope(shield=True):
                    await self._discard(prepared)
                if not pooled:
                    raise SandboxError(f"the sandbox is gone: {exc}") from None
                # Its init died while it waited (killed from outside): make one now.
                log.warning("a prepared sandbox was gone, making another app=%s error=%s",
                            spec.app, exc)  # fmt: skip
                prepared = None
        self._running[prepared.workspace.root] = prepared
        if prepared.cgroup is not None and self._nursery is not None:
            self._nursery.start_soon(_end_on_oom, prepared.cgroup, spec.name)
        assert prepared.process is not None  # a prepared sandbox has its init
        return Launched(prepared.process, prepared.init, prepared.workspace, Inside(shell, env))

    def end_reason(self, launched: Launched) -> list[str]:
        prepared = self._running.get(launched.workspace.root)
        if prepared and prepared.cgroup is not None and prepared.cgroup.ran_out_of_memory():
            return [R15, "Stopping process with SIGKILL"]
        return []

    async def remove(self, launched: Launched) -> None:
        prepared = self._running.pop(launched.workspace.root, None)
        if prepared is not None:
            await self._discard(prepared)

    def remove_leftovers(self) -> None:
        """What a dead manager left: dyno cgroups (with any process still in them) and
        dyno dirs; its inits died with it (their control sockets closed), and with them
        their namespaces, mounts and network pairs."""
        if self.cgroups is not None:
            for group in self.cgroups.leftovers():
                log.warning("removing a dyno cgroup left behind: %s", group.dirs[0])
                group.remove_now()
        remove_dyno_dirs(self.dynos_dir)

    # -- making and removing -------------------------------------------------------------

    async def _prepare(self, recipe: Recipe) -> Prepared:
        """A sandbox for `recipe`, its init waiting for the start message."""
        size = self.config.sizes[recipe.size]
        if not owned_by(recipe.release_dir, recipe.uid, recipe.uid):  # once per release
            await trio.to_thread.run_sync(own_tree, recipe.release_dir, recipe.uid, recipe.uid)
        self.dynos_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        root = self.dynos_dir / f"{recipe.app}.{secrets.token_hex(8)}"
        root.mkdir(mode=0o700)
        # Filled in step by step, so a failure ends what the steps before made.
        prepared = Prepared(recipe, None, InitControl.open(), Workspace(root), None, None)
        cgroup: DynoCgroup | None = None
        try:
            if self.cgroups is not None:
                cgroup = prepared.cgroup = self.cgroups.create(root.name, limits_for(size))
                cgroup.arm_oom()
            if self.network is not None:
                prepared.link = self.network.allocate()
            spec = NamespaceSpec(
                uid=recipe.uid,
                gid=recipe.uid,
                root=root,
                budget=self.config.dynos.tmp_max_bytes,
                lower=recipe.release_dir,
                own_network=self.config.dynos.network != "host",
                veth=prepared.link,
                cgroup_procs=tuple(str(p) for p in cgroup.procs_files) if cgroup else (),
                stack=self.stack,
                hidden=self.hidden,
                files=self._files(recipe.uid),
                data_bytes=None if cgroup else size.memory * 1024 * 1024,
            )
            await self._spawn_init(spec, prepared)
            with trio.fail_after(READY_TIMEOUT):
                await prepared.init.said("ready")
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._discard(prepared)
            raise
        return prepared

    def _files(self, uid: int) -> tuple[tuple[str, str], ...]:
        """Files written for the dyno: its resolv.conf, its passwd and group."""
        files: tuple[tuple[str, str], ...] = ()
        if self.resolv:
            files += (("/etc/resolv.conf", self.resolv),)
        if self.accounts is not None:
            files += account_files(*self.accounts, uid, uid, self._shell_path())
        return files

    def _shell_path(self) -> str:
        return f"/bin/{self.shell}" if Path("/bin", self.shell).exists() else "/bin/sh"

    async def _spawn_init(self, spec: NamespaceSpec, prepared: Prepared) -> Child:
        """Start the init in sandbox mode; its first process says the pid of the dyno's
        PID 1 (a child of ours: `prepared.process` from then on) and ends. Whatever
        happens, the first process is reaped."""
        init = prepared.init
        spec_r, spec_w = os.pipe()
        try:
            # By its descriptor, named plainly: a dyno's `ps` shows no path of the host.
            first = spawn(
                ["dyno-init", "--sandbox", str(spec_r), "--control",
                 str(init.child_control), "--status", str(init.child_status)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=2,
                env={"PATH": TRUSTED_PATH}, cwd=Path("/"),
                pass_fds=(spec_r, self.init_binary.fd, *init.child_fds),
                executable=f"/proc/self/fd/{self.init_binary.fd}",
            )  # fmt: skip
        finally:
            os.close(spec_r)
        try:
            try:
                os.write(spec_w, encode_words(spec_words(spec)))  # small: fits the pipe
            finally:
                os.close(spec_w)
                init.close_child_ends()
            with trio.fail_after(READY_TIMEOUT):
                process = prepared.process = Child.adopt(int(await init.said("pid")))
                await first.wait()
        finally:
            if first.returncode is None:  # given up on: neither a zombie nor its pidfd stays
                with trio.CancelScope(shield=True):
                    first.kill()
                    await first.wait()
        return process

    async def _discard(self, prepared: Prepared) -> None:
        """End a sandbox whatever state it is in: its init (closing the control socket
        ends it, and every process of the dyno with it), its cgroup, pair and dir."""
        prepared.init.close()
        if prepared.cgroup is not None:
            prepared.cgroup.disarm_oom()
            await prepared.cgroup.remove()  # kills what is left in it
        if prepared.process is not None:
            with trio.move_on_after(5):
                await prepared.process.wait()
            if prepared.process.returncode is None:
                prepared.process.kill()
                await prepared.process.wait()
        if prepared.link is not None and self.network is not None:
            self.network.release(prepared.link)  # the pair went with the init's namespace
        root = prepared.workspace.root
        try:
            root.rmdir()  # empty on the host: the dyno's mounts were in its namespace
        except FileNotFoundError:
            pass
        except OSError:
            await trio.to_thread.run_sync(_remove_root, root)

    async def _trial(self) -> None:
        """A real dyno through every step: prepare, start, output, remove."""
        trial_dir = self.dynos_dir / f".trial.{secrets.token_hex(4)}"
        release = trial_dir / "release"
        release.mkdir(parents=True)
        (release / "trial.txt").write_text("ok\n")
        uid = self.config.dynos.uid_range_bounds[1]  # the range's last: no app has it yet
        size = DEFAULT_SIZE if DEFAULT_SIZE in self.config.sizes else next(iter(self.config.sizes))
        spec = DynoSpec(
            app=".trial", name="trial", config_vars={}, pty=None, release_dir=release,
            size=size, uid=uid,
            command="id -u; hostname; cat /app/trial.txt; echo changed > /app/trial.txt;"
            " cat /app/trial.txt",
        )  # fmt: skip
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        null = os.open(os.devnull, os.O_RDONLY)
        try:
            launched = await self.start(spec, [null, out_w, err_w])
            for fd in (null, out_w, err_w):
                os.close(fd)
            null = out_w = err_w = -1
            try:
                with trio.fail_after(READY_TIMEOUT):
                    out = await _read_all(out_r)
                    err = await _read_all(err_r)
                    await launched.process.wait()
            finally:
                with trio.CancelScope(shield=True):
                    await self.remove(launched)
        finally:
            for fd in (null, out_w, err_w, out_r, err_r):
                if fd >= 0:
                    os.close(fd)
            await trio.to_thread.run_sync(_remove_root, trial_dir)
        if out != f"{uid}\ntrial\nok\nchanged\n".encode():
            words = (err or out).decode(errors="replace").strip()
            raise SandboxError(words or "no output")

    def _network_mode(self) -> str:
        return "none" if self.config.dynos.network == "none" else "host"


# -- helpers -------------------------------------------------------------------------


def _parent_group(config: Config) -> str:
    return parent_name(config.state_dir)


def _gateway_paths(config: Config) -> list[tuple[str, bool]]:
    """The gateway's own paths, hidden from dynos where a stack dir would show them."""
    paths = [(str(config.state_dir), True), (str(config.keys_dir), True)]
    if config.source != "<defaults>":
        paths.append((str(Path(config.source).resolve()), False))
    return paths


def _resolv_conf(stack: tuple[StackEntry, ...]) -> str | None:
    """The dynos' resolv.conf: the host's name servers a dyno can reach (the host's own
    loopback resolver cannot be: dynos reach no address of the host)."""
    if not any(entry.path == "/etc" and entry.link is None for entry in stack):
        return None
    texts = []
    for path in ("/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"):
        try:
            texts.append(Path(path).read_text())
        except OSError:
            continue
    return upstream_resolv_conf(texts) or "# the host has no name server a dyno can reach\n"


def _host_accounts(stack: tuple[StackEntry, ...]) -> tuple[str, str] | None:
    """The host's /etc/passwd and /etc/group, where the stack shows the host's /etc."""
    if not any(entry.path == "/etc" and entry.link is None for entry in stack):
        return None
    try:
        return Path("/etc/passwd").read_text(), Path("/etc/group").read_text()
    except OSError:
        return None


def _remove_root(root: Path) -> None:
    """A dyno dir: empty on the host (the dyno's mounts were only in its namespace)."""
    if root.exists():
        remove_tree(root)


async def _read_all(fd: int) -> bytes:
    data = b""
    async with trio.lowlevel.FdStream(os.dup(fd)) as stream:
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


async def _end_on_oom(group: DynoCgroup, dyno: str) -> None:
    """The dyno's OOM watch, in the sandbox's nursery; it ends when the dyno is removed."""
    try:
        await group.end_on_oom()
    except Exception:
        log.exception("OOM watch failed dyno=%s", dyno)
        return
    if group.oom_seen:
        log.warning("dyno out of memory, ending it dyno=%s", dyno)
