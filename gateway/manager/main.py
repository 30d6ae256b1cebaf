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
from collections.abc import AsyncIterator, Callable, Iterator

import trio

from gateway.config import Config
from gateway.manager.agent import AgentUnavailable, serve_agent
from gateway.manager.bwrap import BwrapSandbox, BwrapUnavailable
from gateway.manager.dyno_init import InitBinary, InitUnavailable
from gateway.manager.front import Front, FrontDied, FrontKit
from gateway.manager.listeners import (
    ListenerUnavailable,
    PassedSocketsUnusable,
    close_all,
    open_listeners,
)
from gateway.manager.namespaces import NamespaceSandbox, NamespacesUnavailable
from gateway.manager.sandbox import ProcessSandbox, Sandbox
from gateway.manager.server import Manager
from gateway.privileges import FrontUser, PrivilegeError, front_user
from gateway.store import StoreUnavailable, open_store

log = logging.getLogger(__name__)


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
        user = front_user(config)
        _say_who_runs_the_front(config, user)
        listeners = open_listeners(config, os.environ)
        try:
            kit = FrontKit.gather(config, listeners)
            store = open_store(config)
            sandbox = await choose_sandbox(config)
            manager = Manager(config, store, sandbox, kit, user)
            front = Front(front_argv) if config.front.spawn else None
            stopping = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_signals, signals, stopping, front)
                await nursery.start(sandbox.run)
                await nursery.start(manager.serve)
                await nursery.start(manager.cluster.run)
                if config.database_url and config.cluster.agent_listen:
                    await nursery.start(
                        serve_agent, config.cluster.agent_listen, manager.cluster.agent_reply
                    )
                if front is not None:
                    nursery.start_soon(front.run, manager.front_ready, manager.serve_broker)
                    await manager.front_ready.wait()
                else:
                    # Its own service starts it (contrib/systemd/gateway-front.service),
                    # and may stop and start it again while we run.
                    log.info(
                        "waiting for the SSH front (gateway _front) on %s", config.manager_socket
                    )
                on_ready()
                await stopping.wait()
                manager.cluster.draining = True  # HAProxy's agent-check: no new sessions here
                # The front stops accepting, tells attached clients and gives them
                # drain_timeout to end, then hangs them up (their dynos get SIGHUP); what
                # still runs after that is stopped as run:stop does (SIGTERM, stop_grace,
                # SIGKILL). So a shutdown can take drain_timeout + stop_grace, plus a few
                # seconds of slack at each step; a second signal cuts it short.
                if front is not None:
                    await front.stop(config.shutdown.drain_timeout + 5)
                await manager.stop_all()
                manager.applog.flush()
                manager.cluster.stopped()
                nursery.cancel_scope.cancel()
        finally:
            close_all(listeners)


def _say_who_runs_the_front(config: Config, user: FrontUser | None) -> None:
    """One line on who the network-facing process will be (docs/security.md)."""
    if user is not None:
        log.info(
            "the SSH front runs as user %s: no capabilities, no_new_privs, syscall filter",
            config.front.user,
        )
    else:
        log.warning(
            "not started as root: the SSH front runs as this user (uid %d) too, with "
            "no_new_privs and a syscall filter",
            os.geteuid(),
        )


async def _watch_signals(
    signals: AsyncIterator[int], stopping: trio.Event, front: Front | None
) -> None:
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
        if front is not None:
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
    except* (
        FrontDied,
        SandboxUnavailable,
        StoreUnavailable,
        PrivilegeError,
        PassedSocketsUnusable,
        AgentUnavailable,
    ) as group:
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
