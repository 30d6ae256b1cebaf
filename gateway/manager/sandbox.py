"""Where a dyno runs: its own writable copy of the release, its own session, its env.

This is the plain process sandbox (no namespaces): it keeps dynos from seeing each
other's files and from sharing a terminal or process group with the gateway, and it
is what runs where bubblewrap cannot. The bwrap sandbox replaces `argv` and `prepare`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

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


class ProcessSandbox:
    name = "process"

    def __init__(self, dynos_dir: Path, shell: str) -> None:
        self.dynos_dir = dynos_dir
        self.shell = shell

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
        """Remove the dirs of dynos that a previous manager did not see to their end."""
        if self.dynos_dir.exists():
            for leftover in self.dynos_dir.iterdir():
                if leftover.is_dir() and not leftover.is_symlink():
                    remove_tree(leftover)
                else:
                    leftover.unlink()

    def shell_path(self, root: Path = Path("/")) -> str:
        """bash where the dyno has it, else sh, as `heroku run` does."""
        wanted = root / "bin" / self.shell
        return str(Path("/bin") / self.shell) if wanted.exists() else "/bin/sh"

    def argv(self, spec: DynoSpec) -> list[str]:
        shell = self.shell_path()
        argv = [shell] if spec.command is None else [shell, "-c", spec.command]
        if spec.pty is not None:
            # A new session whose controlling terminal is the PTY on stdin, so the shell
            # gets job control and Ctrl-C reaches the foreground job.
            return ["setsid", "--ctty", *argv]
        return argv

    def env(self, spec: DynoSpec, workspace: Workspace) -> dict[str, str]:
        env = {"PATH": BASE_PATH, "HOME": str(workspace.app), "LANG": "C.UTF-8"}
        env.update(spec.config_vars)
        env["DYNO"] = spec.name
        env["PWD"] = str(workspace.app)
        if spec.pty is not None:
            env["TERM"] = spec.pty.term or "xterm"
            env["COLUMNS"], env["LINES"] = str(spec.pty.cols), str(spec.pty.rows)
        return env
