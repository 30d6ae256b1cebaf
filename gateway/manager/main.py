"""`gateway serve`: the trio dyno manager, which starts and watches the SSH front.

The manager is the parent so that, run as root, it keeps the privileges sandboxes need
while the network-facing front can drop them (OpenSSH's privilege separation). If the
front dies the gateway exits non-zero (every attached dyno gets SIGHUP as its connection
closes) and the service manager restarts it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable

import trio

from gateway.config import Config
from gateway.manager.bwrap import BwrapSandbox, BwrapUnavailable
from gateway.manager.dyno_init import InitBinary, InitUnavailable
from gateway.manager.sandbox import ProcessSandbox, Sandbox
from gateway.manager.supervisor import Manager
from gateway.store import Store

log = logging.getLogger("gateway.manager")


class FrontDied(Exception):
    pass


class SandboxUnavailable(Exception):
    pass


async def serve(config: Config, front_argv: list[str], on_ready: Callable[[], None]) -> None:
    store = Store(config.db_path)
    sandbox = choose_sandbox(config)
    manager = Manager(config, store, sandbox)
    front = Front(front_argv)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        await nursery.start(front.run)
        on_ready()
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("stopping on %s", signal.Signals(signum).name)
                break
        # The front stops accepting, tells attached clients, drains, then hangs them up
        # (their dynos get SIGHUP); what still runs after that is stopped as run:stop does.
        await front.stop(config.shutdown.drain_timeout + 5)
        await manager.stop_all()
        nursery.cancel_scope.cancel()


def choose_sandbox(config: Config) -> Sandbox:
    """The sandbox `dynos.sandbox` asks for, said loudly, or SandboxUnavailable.

    "bwrap" and "auto" first run a trial dyno through bubblewrap; "bwrap" refuses to
    start with the trial's error, "auto" falls back to the process sandbox."""
    wanted = config.dynos.sandbox
    try:
        init = InitBinary.ensure(config.state_dir / "lib")
    except InitUnavailable as exc:
        raise SandboxUnavailable(str(exc)) from None
    if wanted in ("bwrap", "auto"):
        try:
            bwrap = BwrapSandbox.probe(config, strict=wanted == "bwrap", init=init)
        except BwrapUnavailable as exc:
            if wanted == "bwrap":
                raise SandboxUnavailable(
                    f'dynos.sandbox = "bwrap" cannot work here: {exc}'
                ) from None
            log.warning("bubblewrap cannot work here, falling back: %s", exc)
        else:
            if bwrap.plan.notes:
                log.warning(bwrap.describe())
            else:
                log.info(bwrap.describe())
            return bwrap
    sandbox = ProcessSandbox(config.dynos_dir, config.dynos.shell, init)
    log.warning(sandbox.describe())
    return sandbox


class Front:
    """The SSH front, a child process: started, watched, and given time to drain."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.stopping = False
        self.exited = trio.Event()
        self._process: trio.Process | None = None

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the front and hold it: `ready` tells us it listens, and the lifeline (a
        pipe we never write) tells it when we are gone, whichever way we die."""
        ready_r, ready_w = os.pipe()
        lifeline_r, lifeline_w = os.pipe()
        env = dict(os.environ, GATEWAY_READY_FD=str(ready_w), GATEWAY_LIFELINE_FD=str(lifeline_r))
        # glibc: keep freed memory instead of returning it at once; bulk transfers
        # otherwise fault in fresh pages for every MB they move (docs/benchmarks.md).
        env.setdefault("MALLOC_TRIM_THRESHOLD_", str(16 * 1024 * 1024))
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(4 * 1024 * 1024))
        try:
            front = await trio.lowlevel.open_process(
                self.argv, pass_fds=(ready_w, lifeline_r), env=env
            )
        finally:
            os.close(ready_w)
            os.close(lifeline_r)
        self._process = front
        try:
            async with trio.lowlevel.FdStream(ready_r) as ready:
                if not await ready.receive_some(16):
                    raise FrontDied(f"the SSH front exited at start (status {await front.wait()})")
            task_status.started()
            status = await front.wait()
            self.exited.set()
            if not self.stopping:
                raise FrontDied(f"the SSH front exited with status {status}")
        finally:
            os.close(lifeline_w)
            with trio.CancelScope(shield=True):
                front.terminate()
                with trio.move_on_after(10):
                    await front.wait()
                front.kill()

    async def stop(self, timeout: float) -> None:
        """SIGTERM (the front drains) and wait for it to exit, at most `timeout` seconds."""
        self.stopping = True
        if self._process is not None:
            self._process.terminate()
        with trio.move_on_after(timeout):
            await self.exited.wait()


def run(config: Config, front_argv: list[str], on_ready: Callable[[], None]) -> int:
    failures: list[BaseException] = []
    try:
        trio.run(serve, config, front_argv, on_ready)
    except* (FrontDied, SandboxUnavailable) as group:
        failures.extend(group.exceptions)
    for exc in failures:
        print(f"gateway: {exc}", file=sys.stderr)
    return 1 if failures else 0
