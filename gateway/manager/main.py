"""`gateway serve`: the trio dyno manager, which starts and watches the SSH front.

The manager is the parent so that, run as root, it keeps the privileges sandboxes need
while the network-facing front can drop them (OpenSSH's privilege separation). If the
front dies the gateway exits non-zero (every attached dyno gets SIGHUP as its connection
closes) and the service manager restarts it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator

import trio

from gateway.config import Config
from gateway.manager.bwrap import BwrapSandbox, BwrapUnavailable
from gateway.manager.dyno_init import InitBinary, InitUnavailable
from gateway.manager.namespaces import NamespaceSandbox, NamespacesUnavailable
from gateway.manager.sandbox import ProcessSandbox, Sandbox
from gateway.manager.server import Manager
from gateway.store import StoreUnavailable, open_store

log = logging.getLogger(__name__)
# What the front writes on its ready pipe once it listens (gateway/front/main.py READY).
READY = b"ready\n"


class FrontDied(Exception):
    pass


class ListenerUnavailable(FrontDied):
    """The front could not open a listener: which `[table] listen`, and why."""

    def __init__(self, table: str, listen: str, reason: str) -> None:
        super().__init__(f"[{table}] listen {listen}: {reason}")
        self.table = table


class SandboxUnavailable(Exception):
    pass


class StoppedNow(Exception):
    """A second SIGINT or SIGTERM during a graceful shutdown: stop without waiting."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


async def serve(config: Config, front_argv: list[str], on_ready: Callable[[], None]) -> None:
    # Signals are ours from the start, so that Ctrl-C never surfaces as a
    # KeyboardInterrupt in the middle of a task.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        store = open_store(config)
        sandbox = await choose_sandbox(config)
        manager = Manager(config, store, sandbox)
        front = Front(front_argv)
        stopping = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, signals, stopping, front)
            await nursery.start(sandbox.run)
            await nursery.start(manager.serve)
            await nursery.start(front.run)
            on_ready()
            await stopping.wait()
            # The front stops accepting, tells attached clients and gives them
            # drain_timeout to end, then hangs them up (their dynos get SIGHUP); what
            # still runs after that is stopped as run:stop does (SIGTERM, stop_grace,
            # SIGKILL). So a shutdown can take drain_timeout + stop_grace, plus a few
            # seconds of slack at each step; a second signal cuts it short.
            await front.stop(config.shutdown.drain_timeout + 5)
            await manager.stop_all()
            nursery.cancel_scope.cancel()


async def _watch_signals(signals: AsyncIterator[int], stopping: trio.Event, front: Front) -> None:
    """The first SIGINT or SIGTERM starts the graceful shutdown; a second one stops now:
    the front is killed (every connection drops, attached dynos get SIGHUP) and
    StoppedNow cancels the rest, so each dyno gets SIGTERM and, a second later, SIGKILL."""
    first = True
    async for signum in signals:
        if first:
            first = False
            log.info("stopping on %s", signal.Signals(signum).name)
            stopping.set()
            continue
        name = signal.Signals(signum).name
        what = "interrupt" if signum == signal.SIGINT else name
        # One line, as the user's answer (the log goes to the same stderr).
        print(f"gateway: second {what}, stopping now", file=sys.stderr, flush=True)
        front.kill()
        raise StoppedNow(signum)


async def choose_sandbox(config: Config) -> Sandbox:
    """The sandbox `dynos.sandbox` asks for, said loudly, or SandboxUnavailable.

    "auto" takes the strongest that works here: as root the namespaces sandbox, else
    bubblewrap in a user namespace, else the plain process sandbox. It moves on only for
    the known reasons a sandbox cannot work (not root, a tool or kernel feature missing:
    each sandbox's *Unavailable), each said in the log; anything else is a bug and stops
    the gateway with its traceback. A sandbox asked for by name refuses to start
    instead of falling back."""
    wanted = config.dynos.sandbox
    try:
        init = InitBinary.ensure(config.state_dir / "lib")
    except InitUnavailable as exc:
        raise SandboxUnavailable(str(exc)) from None
    sandbox: Sandbox
    if wanted in ("namespaces", "auto"):
        try:
            namespaces = await NamespaceSandbox.probe(config, init, strict=wanted != "auto")
        except NamespacesUnavailable as exc:
            if wanted != "auto":
                raise SandboxUnavailable(
                    f'dynos.sandbox = "namespaces" cannot work here: {exc}'
                ) from None
            log.warning("the namespaces sandbox cannot work here, trying bubblewrap: %s", exc)
        else:
            _announce(namespaces.describe(), bool(namespaces.notes))
            return namespaces
    if wanted in ("bwrap", "auto"):
        try:
            bwrap = await BwrapSandbox.probe(config, strict=wanted == "bwrap", init=init)
        except BwrapUnavailable as exc:
            if wanted == "bwrap":
                raise SandboxUnavailable(
                    f'dynos.sandbox = "bwrap" cannot work here: {exc}'
                ) from None
            log.warning("bubblewrap cannot work here, falling back: %s", exc)
        else:
            _announce(bwrap.describe(), bool(bwrap.notes))
            return bwrap
    sandbox = ProcessSandbox(config.dynos_dir, config.dynos.shell, init)
    log.warning(sandbox.describe())
    return sandbox


def _announce(line: str, weaker: bool) -> None:
    if weaker:
        log.warning(line)
    else:
        log.info(line)


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
                said = await _read_line(ready)
            if said != READY:
                status = await front.wait()
                try:
                    failure = json.loads(said)
                    table, listen, reason = (str(failure[k]) for k in ("table", "listen", "reason"))
                except (ValueError, KeyError, TypeError):
                    raise FrontDied(f"the SSH front exited at start (status {status})") from None
                raise ListenerUnavailable(table, listen, reason)
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

    def kill(self) -> None:
        """SIGKILL, no drain: for a second interrupt."""
        self.stopping = True
        if self._process is not None and self._process.returncode is None:
            self._process.kill()

    async def stop(self, timeout: float) -> None:
        """SIGTERM (the front drains) and wait for it to exit, at most `timeout` seconds."""
        self.stopping = True
        if self._process is not None:
            self._process.terminate()
        with trio.move_on_after(timeout):
            await self.exited.wait()


async def _read_line(stream: trio.lowlevel.FdStream, limit: int = 4096) -> bytes:
    """Bytes up to and including the first newline, or all there were before EOF."""
    data = b""
    while b"\n" not in data and len(data) < limit:
        chunk = await stream.receive_some(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data


def run(
    config: Config,
    front_argv: list[str],
    on_ready: Callable[[], None],
    how_to_move: Callable[[str], str] = lambda table: "",
) -> int:
    """Serve until stopped; the exit status. Failures are one line each on stderr, no
    traceback; a listener that cannot be opened comes with `how_to_move(table)`.
    Stopped now by a second signal: 128 + its number, as a shell reports a kill."""
    failures: list[str] = []
    status = 0
    try:
        trio.run(serve, config, front_argv, on_ready)
    except* StoppedNow as group:
        for exc in _leaves(group):
            if isinstance(exc, StoppedNow):
                status = 128 + exc.signum
    except* ListenerUnavailable as group:
        for exc in _leaves(group):
            hint = how_to_move(exc.table) if isinstance(exc, ListenerUnavailable) else ""
            failures.append(f"{exc}; {hint}" if hint else str(exc))
    except* (FrontDied, SandboxUnavailable, StoreUnavailable) as group:
        failures.extend(str(exc) for exc in _leaves(group))
    for line in failures:
        print(f"gateway: {line}", file=sys.stderr)
    return 1 if failures else status


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    """The exceptions in `group` and in the groups nested in it."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc
