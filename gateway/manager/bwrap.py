"""The bubblewrap sandbox: for a gateway that does not run as root (as root, the namespaces
sandbox is stronger: gateway/manager/namespaces.py).

bwrap makes each dyno a user namespace (its uid 65534 is the gateway's own user on the
host), with its own PID, IPC, UTS and cgroup namespaces, the stack read-only, a private
copy of the release at /app, a capped /tmp, no capabilities; the dyno's init is its PID 1.
Without root there are no cgroups to give: rlimits cap memory (RLIMIT_DATA) and files;
and no network namespace with a way out: dynos share the host's network (or none).
docs/sandbox.md has the comparison.
"""

from __future__ import annotations

import logging
import os
import resource
import secrets
import subprocess
from pathlib import Path

import trio

from gateway.config import DEFAULT_SIZE, Config
from gateway.core.environment import dyno_env
from gateway.manager.bwrap_args import (
    DYNO_UID,
    NOFILE,
    TOOLS,
    Layout,
    bwrap_args,
    encode_args,
    hidden_args,
    inner_argv,
    wrapper_argv,
)
from gateway.manager.dyno_init import InitBinary, InitControl
from gateway.manager.sandbox import (
    OWN_NETWORK_PORT,
    Command,
    DynoSpec,
    Inside,
    ReleaseCopySandbox,
    SandboxError,
    Workspace,
    free_port,
)
from gateway.manager.spawn import TRUSTED_PATH, find_tools
from gateway.manager.stack import look_at_stack
from gateway.slugs import remove_tree

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 30.0


class BwrapUnavailable(Exception):
    """bwrap cannot run dynos here; the message says why."""


class BwrapSandbox(ReleaseCopySandbox):
    name = "bwrap"

    def __init__(
        self, config: Config, tools: dict[str, str], network: str, init: InitBinary
    ) -> None:
        self.config = config
        self.tools = tools
        self.network = network  # none | host: without root, nothing routes out of a netns
        self.notes: tuple[str, ...] = ()
        self.shell = config.dynos.shell
        self.dynos_dir = config.dynos_dir
        self.stack = look_at_stack(config.dynos.stack)
        self.hidden = hidden_args(self.stack, _gateway_paths(config))
        self.init = init

    # -- choosing ----------------------------------------------------------------------

    @classmethod
    async def probe(cls, config: Config, strict: bool, init: InitBinary) -> BwrapSandbox:
        """A bwrap sandbox that has just run a trial dyno here, or BwrapUnavailable.

        With `strict` (sandbox = "bwrap"), outbound networking that cannot work is an
        error; otherwise (auto) the dynos share the host's network, and the log says so."""
        if os.geteuid() == 0:
            raise BwrapUnavailable(
                "the gateway runs as root: use the namespaces sandbox (dynos.sandbox = "
                '"namespaces" or "auto"); bubblewrap is for a gateway without root'
            )
        tools, missing = find_tools(TOOLS)
        if missing:
            raise BwrapUnavailable(
                f"not found on {TRUSTED_PATH}: {', '.join(missing)}"
                + (" (Debian: apt-get install bubblewrap)" if "bwrap" in missing else "")
            )
        network, notes = config.dynos.network, ["no cgroup limits without root: rlimits only"]
        if network == "outbound":
            if strict:
                raise BwrapUnavailable(
                    'network = "outbound" needs root (the namespaces sandbox); '
                    'choose network = "host" or "none"'
                )
            network = "host"
            notes.append("network host (outbound NAT needs root)")
        sandbox = cls(config, tools, network, init)
        sandbox.notes = tuple(notes)
        try:
            await sandbox._trial()
        except (OSError, SandboxError, trio.TooSlowError) as exc:
            # A tool that failed (its own words), a trial that misbehaved or hung: what the
            # host lacks. Anything else is a bug: it propagates with its traceback, and
            # the gateway does not start on a quietly weaker sandbox.
            raise BwrapUnavailable(f"{type(exc).__name__}: {exc}") from None
        return sandbox

    async def _trial(self) -> None:
        """Run a real dyno through every step: copy, the wrapper, bwrap, remove."""
        trial_dir = self.dynos_dir / f".trial.{secrets.token_hex(4)}"
        release = trial_dir / "release"
        release.mkdir(parents=True)
        (release / "trial.txt").write_text("ok\n")
        size = DEFAULT_SIZE if DEFAULT_SIZE in self.config.sizes else next(iter(self.config.sizes))
        spec = DynoSpec(
            app="trial", name="trial", config_vars={}, pty=None, release_dir=release, size=size,
            command="id -u; hostname; cat /app/trial.txt; echo changed > /app/trial.txt",
        )  # fmt: skip
        try:
            workspace = await self.prepare(spec)
            init = InitControl.open()
            try:
                command = self.command(spec, workspace, init)
                with trio.fail_after(PROBE_TIMEOUT):
                    result = await trio.run_process(
                        command.argv, env=command.env, cwd=command.cwd,
                        stdin=subprocess.DEVNULL, capture_stdout=True, capture_stderr=True,
                        check=False, pass_fds=(*command.pass_fds, *init.child_fds),
                    )  # fmt: skip
            finally:
                init.close()
                await self.remove_workspace(workspace)
        finally:
            if trial_dir.exists():
                remove_tree(trial_dir)
        if result.returncode != 0 or result.stdout != f"{DYNO_UID}\ntrial\nok\n".encode():
            words = (result.stderr or result.stdout).decode(errors="replace").strip()
            raise SandboxError(f"a trial dyno failed ({result.returncode}): {words or '-'}")

    def describe(self) -> str:
        line = (
            "sandbox in force: bwrap (user, pid, mount, ipc, uts namespaces; uid "
            f"{DYNO_UID} mapped to the gateway's user, without capabilities; /app a copy "
            f"of the release; /tmp capped at {self.config.dynos.tmp_max_bytes} bytes; "
            f"network {self.network}; limits: rlimits only)"
        )
        return line + "; weaker than configured: " + "; ".join(self.notes) if self.notes else line

    # -- what ReleaseCopySandbox leaves to it ------------------------------------------

    def copy_tools(self) -> tuple[str, str]:
        return self.tools["cp"], self.tools["chmod"]  # resolved by find_tools

    def command(self, spec: DynoSpec, workspace: Workspace, init: InitControl) -> Command:
        shell = f"/bin/{self.shell}" if Path("/bin", self.shell).exists() else "/bin/sh"
        inside = dyno_env(
            name=spec.name,
            config_vars=spec.config_vars,
            app_dir="/app",
            port=free_port() if self.network == "host" else OWN_NETWORK_PORT,
            pty=spec.pty,
        )
        args = bwrap_args(
            hostname=spec.name,
            stack=self.stack,
            hidden=self.hidden,
            layout=Layout(str(workspace.app), self.config.dynos.tmp_max_bytes),
            network=self.network,
            env=inside,
        )
        args_path = workspace.root / "args"
        fd = os.open(args_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(encode_args(args))
        inner = inner_argv(
            self.init.fd, init.init_args(ctty=spec.pty is not None), shell, spec.command
        )
        memory_kb = self.config.sizes[spec.size].memory * 1024
        env = {
            "PATH": TRUSTED_PATH,
            "GW_ARGS": str(args_path),
            "GW_NOFILE": str(_nofile()),
            "GW_DATA_KB": str(memory_kb),
        }
        return Command(
            wrapper_argv(self.tools, inner), env, workspace.root, (self.init.fd,),
            Inside(shell, inside),
        )  # fmt: skip


def _nofile() -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return NOFILE if hard == resource.RLIM_INFINITY else min(NOFILE, hard)


def _gateway_paths(config: Config) -> list[tuple[str, bool]]:
    """The gateway's own paths, hidden from dynos where a stack dir would show them."""
    paths = [(str(config.state_dir), True), (str(config.keys_dir), True)]
    if config.source != "<defaults>":
        paths.append((str(Path(config.source).resolve()), False))
    return paths
