"""Where a dyno runs. `Sandbox` is what the supervisor needs of any sandbox;
`ProcessSandbox` is the plain one, and `start_command` how the sandboxes that start a
command per dyno (this one, bubblewrap) spawn it.

The process sandbox (no namespaces) keeps dynos from seeing each other's files and from
sharing a terminal or process group with the gateway; it is what runs where bubblewrap
cannot, and `gateway serve` says so loudly.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

from gateway.core.environment import dyno_env
from gateway.core.protocol import Pty
from gateway.manager.dyno_init import InitBinary, InitControl
from gateway.manager.spawn import Child, spawn
from gateway.slugs import remove_tree

# $PORT in a dyno with a network namespace of its own (nothing else listens there).
OWN_NETWORK_PORT = 5000


@dataclass(frozen=True)
class Workspace:
    """A dyno's private directory: `app` is its writable copy of the release."""

    root: Path

    @property
    def app(self) -> Path:
        return self.root / "app"


@dataclass(frozen=True)
class DynoSpec:
    app: str
    name: str
    command: str | None  # None: an interactive shell
    config_vars: dict[str, str]
    pty: Pty | None
    release_dir: Path
    size: str = "standard-1x"
    uid: int | None = None  # the app's own uid (the namespaces sandbox runs dynos as it)


@dataclass(frozen=True)
class Command:
    """How to start a dyno's process: the supervisor adds stdio and a new session.
    `pass_fds` are the descriptors the process inherits beside stdio; `inside` is the
    dyno's shell and environment as its processes see them (what `ssh APP.run.N` gets)."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path
    pass_fds: tuple[int, ...] = ()
    inside: Inside | None = None


@dataclass(frozen=True)
class Inside:
    """A running dyno's shell (its path inside the dyno) and environment: what a process
    entered into the dyno starts with."""

    shell: str
    env: dict[str, str]

    def argv(self, command: str | None) -> list[str]:
        return [self.shell] if command is None else [self.shell, "-c", command]


class SandboxError(Exception):
    """A dyno could not be started in its sandbox; the message says why, for the log."""


@dataclass
class Launched:
    """A dyno whose command runs: its init (whose end is the dyno's end), the channel to
    that init, and what the sandbox holds for the dyno."""

    process: Child
    init: InitControl
    workspace: Workspace
    inside: Inside


class Sandbox(Protocol):
    name: str
    shell: str  # the shell's name, for records and banners ("bash")

    def describe(self) -> str:
        """One line for the log at start: which sandbox, and what it does not isolate."""
        ...

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The sandbox's own work for as long as the manager serves (prepared sandboxes,
        memory watches), in a task the manager owns; returns at once where there is none."""
        ...

    async def start(self, spec: DynoSpec, stdio: list[int]) -> Launched:
        """The dyno's command running in its sandbox with `stdio` (stdin, stdout, stderr:
        the caller keeps and closes its copies). SandboxError if it cannot start; then
        nothing of the dyno is left."""
        ...

    def end_reason(self, launched: Launched) -> list[str]:
        """Heroku error lines for the app log when the sandbox's limits ended the dyno
        (for example R15 for memory); empty otherwise. Called after the process ended."""
        ...

    async def remove(self, launched: Launched) -> None:
        """Remove everything the dyno had: processes left, mounts, limits, files."""
        ...

    def remove_leftovers(self) -> None:
        """At start: remove what dynos of a previous, dead manager left behind."""
        ...


def start_command(
    build: Callable[[InitControl], Command], stdio: list[int], workspace: Workspace
) -> Launched:
    """Spawn a sandbox's command for a dyno (`build` makes it, given the channels to the
    dyno's init). SandboxError when it cannot be started (the caller removes the
    workspace)."""
    init = InitControl.open()
    try:
        command = build(init)
        process = spawn(
            command.argv,
            stdin=stdio[0],
            stdout=stdio[1],
            stderr=stdio[2],
            env=command.env,
            cwd=command.cwd,
            pass_fds=(*command.pass_fds, *init.child_fds),
        )
    except OSError as exc:
        init.close()
        raise SandboxError(exc.strerror or str(exc)) from None
    except BaseException:
        init.close()
        raise
    init.close_child_ends()
    assert command.inside is not None  # every sandbox's command says it
    return Launched(process, init, workspace, command.inside)


class ReleaseCopySandbox:
    """What the sandboxes that give each dyno its own copy of the release share (the
    process sandbox, bubblewrap): the copy made in a private dir as the dyno starts, the
    command started over it (`command`, theirs), the dir removed when it ends."""

    dynos_dir: Path

    def command(self, spec: DynoSpec, workspace: Workspace, init: InitControl) -> Command:
        raise NotImplementedError

    def copy_tools(self) -> tuple[str, str]:
        """The `cp` and `chmod` to copy a release with."""
        return "cp", "chmod"

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    async def start(self, spec: DynoSpec, stdio: list[int]) -> Launched:
        try:
            workspace = await self.prepare(spec)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise SandboxError(f"the release could not be copied: {exc}") from None
        try:
            return start_command(lambda init: self.command(spec, workspace, init), stdio, workspace)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.remove_workspace(workspace)
            raise

    async def prepare(self, spec: DynoSpec) -> Workspace:
        """The dyno's dir (mode 0700), with its own copy of the release at app/."""
        self.dynos_dir.mkdir(parents=True, exist_ok=True)
        root = self.dynos_dir / f"{spec.app}.{spec.name}.{secrets.token_hex(8)}"
        root.mkdir(mode=0o700)
        workspace = Workspace(root)
        cp, chmod = self.copy_tools()
        try:
            await trio.run_process(
                [cp, "-a", "--reflink=auto", f"{spec.release_dir}/.", str(workspace.app)],
                capture_stderr=True,
            )
            # Releases are read-only; the dyno's copy is its own to change.
            await trio.run_process([chmod, "-R", "u+w", str(workspace.app)])
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.remove_workspace(workspace)
            raise
        return workspace

    def end_reason(self, launched: Launched) -> list[str]:
        return []

    async def remove(self, launched: Launched) -> None:
        launched.init.close()
        await self.remove_workspace(launched.workspace)

    async def remove_workspace(self, workspace: Workspace) -> None:
        if workspace.root.exists():
            await trio.to_thread.run_sync(remove_tree, workspace.root)

    def remove_leftovers(self) -> None:
        remove_dyno_dirs(self.dynos_dir)


class ProcessSandbox(ReleaseCopySandbox):
    name = "process"

    def __init__(self, dynos_dir: Path, shell: str, init: InitBinary) -> None:
        self.dynos_dir = dynos_dir
        self.shell = shell
        self.init = init

    def describe(self) -> str:
        return (
            "sandbox in force: process (own copy of the app, own session, no namespaces: "
            "dynos can see the host's processes and files)"
        )

    def shell_path(self, root: Path = Path("/")) -> str:
        """bash where the dyno has it, else sh, as `heroku run` does."""
        wanted = root / "bin" / self.shell
        return str(Path("/bin") / self.shell) if wanted.exists() else "/bin/sh"

    def command(self, spec: DynoSpec, workspace: Workspace, init: InitControl) -> Command:
        shell = self.shell_path()
        program = [shell] if spec.command is None else [shell, "-c", spec.command]
        # The init is a subreaper here (no PID namespace): it outlives the command when
        # the client hung up and something survived, and it ends with the manager (its
        # control socket closes).
        argv = [str(self.init.path), *init.init_args(ctty=spec.pty is not None), "--", *program]
        env = dyno_env(
            name=spec.name,
            config_vars=spec.config_vars,
            app_dir=str(workspace.app),
            port=free_port(),
            pty=spec.pty,
        )
        return Command(argv, env, workspace.app, inside=Inside(shell, env))


def free_port() -> int:
    """A port nothing listens on now, for $PORT of a dyno on the host's network."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def remove_dyno_dirs(dynos_dir: Path) -> None:
    """Remove the dirs of dynos that a previous manager did not see to their end."""
    if dynos_dir.exists():
        for leftover in dynos_dir.iterdir():
            if leftover.is_dir() and not leftover.is_symlink():
                remove_tree(leftover)
            else:
                leftover.unlink()
