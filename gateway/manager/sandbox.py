"""Where a dyno runs. `Sandbox` is what the supervisor needs of any sandbox;
`ProcessSandbox` is the plain one.

The process sandbox (no namespaces) keeps dynos from seeing each other's files and from
sharing a terminal or process group with the gateway; it is what runs where bubblewrap
cannot, and `gateway serve` says so loudly.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

from gateway.core.messages import Pty
from gateway.slugs import remove_tree

BASE_PATH = "/usr/local/bin:/usr/bin:/bin"


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


@dataclass(frozen=True)
class Command:
    """How to start a dyno's process: the supervisor adds stdio and a new session."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path


class Sandbox(Protocol):
    name: str
    shell: str  # the shell's name, for records and banners ("bash")

    def describe(self) -> str:
        """One line for the log at start: which sandbox, and what it does not isolate."""
        ...

    async def prepare(self, spec: DynoSpec) -> Workspace:
        """Make the dyno's private, writable view of its release."""
        ...

    def command(self, spec: DynoSpec, workspace: Workspace) -> Command: ...

    def end_reason(self, workspace: Workspace) -> list[str]:
        """Heroku error lines for the app log when the sandbox's limits ended the dyno
        (for example R15 for memory); empty otherwise. Called after the process ended."""
        ...

    async def remove(self, workspace: Workspace) -> None:
        """Remove everything the dyno had: processes left, mounts, limits, files."""
        ...

    def remove_leftovers(self) -> None:
        """At start: remove what dynos of a previous, dead manager left behind."""
        ...


class ProcessSandbox:
    name = "process"

    def __init__(self, dynos_dir: Path, shell: str) -> None:
        self.dynos_dir = dynos_dir
        self.shell = shell

    def describe(self) -> str:
        return (
            "sandbox in force: process (own copy of the app, own session, no namespaces: "
            "dynos can see the host's processes and files)"
        )

    async def prepare(self, spec: DynoSpec) -> Workspace:
        """Copy the release into a fresh private dir (mode 0700)."""
        self.dynos_dir.mkdir(parents=True, exist_ok=True)
        root = self.dynos_dir / f"{spec.app}.{spec.name}.{secrets.token_hex(4)}"
        root.mkdir(mode=0o700)
        workspace = Workspace(root)
        try:
            await trio.run_process(
                ["cp", "-a", "--reflink=auto", f"{spec.release_dir}/.", str(workspace.app)],
                capture_stderr=True,
            )
            # Releases are read-only; the dyno's copy is its own to change.
            await trio.run_process(["chmod", "-R", "u+w", str(workspace.app)])
        except BaseException:
            await self.remove(workspace)
            raise
        return workspace

    async def remove(self, workspace: Workspace) -> None:
        if workspace.root.exists():
            await trio.to_thread.run_sync(remove_tree, workspace.root)

    def remove_leftovers(self) -> None:
        remove_dyno_dirs(self.dynos_dir)

    def shell_path(self, root: Path = Path("/")) -> str:
        """bash where the dyno has it, else sh, as `heroku run` does."""
        wanted = root / "bin" / self.shell
        return str(Path("/bin") / self.shell) if wanted.exists() else "/bin/sh"

    def command(self, spec: DynoSpec, workspace: Workspace) -> Command:
        return Command(self.argv(spec), self.env(spec, workspace), workspace.app)

    def end_reason(self, workspace: Workspace) -> list[str]:
        return []

    def argv(self, spec: DynoSpec) -> list[str]:
        shell = self.shell_path()
        argv = [shell] if spec.command is None else [shell, "-c", spec.command]
        if spec.pty is not None:
            # A new session whose controlling terminal is the PTY on stdin, so the shell
            # gets job control and Ctrl-C reaches the foreground job.
            argv = ["setsid", "--ctty", *argv]
        # If the manager is killed outright, the dyno's process goes with it (what it
        # started is found by its process group on the next start).
        return ["setpriv", "--pdeathsig", "KILL", "--", *argv]

    def env(self, spec: DynoSpec, workspace: Workspace) -> dict[str, str]:
        env = {"PATH": BASE_PATH, "HOME": str(workspace.app), "LANG": "C.UTF-8"}
        env.update(spec.config_vars)
        env["DYNO"] = spec.name
        env["PWD"] = str(workspace.app)
        if spec.pty is not None:
            env["TERM"] = spec.pty.term or "xterm"
            env["COLUMNS"], env["LINES"] = str(spec.pty.cols), str(spec.pty.rows)
        return env


def remove_dyno_dirs(dynos_dir: Path) -> None:
    """Remove the dirs of dynos that a previous manager did not see to their end."""
    if dynos_dir.exists():
        for leftover in dynos_dir.iterdir():
            if leftover.is_dir() and not leftover.is_symlink():
                remove_tree(leftover)
            else:
                leftover.unlink()
