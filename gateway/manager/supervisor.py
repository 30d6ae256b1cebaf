"""One dyno, from its Run request to its closed record: one trio task each, a child of
the connection that asked for it, so no dyno outlives its supervisor.

The connection is the dyno's control channel and its lifetime is the attachment: when
the front closes it, the client is gone and the dyno is hung up, as sshd's sessions are.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from dataclasses import replace

import trio

from gateway.audit import AuditLog
from gateway.config import Config
from gateway.core import applog, sizes
from gateway.core.dyno import Exit, State
from gateway.core.procfile import resolve_command
from gateway.core.protocol import (
    Attach,
    Exited,
    RemoteProtocolError,
    Reserved,
    Run,
    Started,
)
from gateway.eventlog import EventLog, event_log
from gateway.manager import metrics
from gateway.manager.applog import AppLog
from gateway.manager.connection import FrontConnection
from gateway.manager.dyno import RunningDyno
from gateway.manager.lifecycle import DynoLife
from gateway.manager.orphans import start_time
from gateway.manager.releases import ReleaseCache, ReleaseUnavailable
from gateway.manager.sandbox import DynoSpec, Launched, Sandbox, SandboxError
from gateway.manager.sftp import (
    SHOWN,
    SUBSYSTEM_GRACE,
    SubsystemUnavailable,
    audit_sftp_log,
    subsystem_command,
)
from gateway.manager.stdio import Stdio
from gateway.store import DynoLimitReached, DynoRecord, Store, StoreError

_logger = logging.getLogger(__name__)

# After a detached dyno's process ends, how long its last output may take to reach the log.
DRAIN_AFTER_EXIT = 5


class Refused(Exception):
    """A request the manager will not carry out; the message goes to the client as is."""


class Supervisor:
    """The dynos of this manager: starting, supervising and stopping them."""

    def __init__(
        self, config: Config, store: Store, sandbox: Sandbox, log: AppLog, audit: AuditLog
    ) -> None:
        self.config = config
        self.store = store
        self.sandbox = sandbox
        self.applog = log
        self.audit = audit
        # Releases unpacked on this node; fetched from the store on first use.
        self.releases = ReleaseCache(config)
        # The dynos supervised here, by (app, name): None while one is being prepared.
        self.running: dict[tuple[str, str], RunningDyno | None] = {}
        self._none_running = trio.Event()
        self._none_running.set()

    # -- starting ----------------------------------------------------------------------

    async def run(self, conn: FrontConnection, request: Run) -> None:
        """Name the dyno, start it (when its client comes, for a rendezvous), and see it to
        its end. Refused for what the user can fix."""
        app = self.store.get_app(request.app)
        if app is None:
            raise Refused(f"no such app: {request.app}")
        size = request.size or app.size
        cap = app.max_size or self.config.dynos.max_size
        if (why := sizes.refusal(self.config.sizes, size, cap, app.name)) is not None:
            raise Refused(why)
        release = self.store.latest_release(app.name)
        if release is None:
            raise Refused(
                f"app {app.name} has no release yet: "
                f"create one with `gateway releases:create {app.name} SLUG.tgz`"
            )
        self._check_host_limit()
        command = resolve_command(request.command, release.procfile) if request.command else None
        if request.subsystem is not None:
            try:
                subsystem_command(self.config, request.subsystem)
            except SubsystemUnavailable as exc:
                raise Refused(str(exc)) from None
            command = SHOWN[request.subsystem]
        try:
            record = self.store.create_dyno(
                app.name,
                command or self.sandbox.shell,
                size,
                release.version,
                request.attach,
                max_running=self.config.dynos.max_per_app,
            )
        except DynoLimitReached as exc:
            raise Refused(
                f"{app.name} already runs {exc.running} one-off dynos, the most allowed "
                "(dynos.max_per_app); stop one with run:stop"
            ) from None
        log = event_log(__name__, app=app.name, dyno=record.name, conn=request.connection)
        life = DynoLife(self.store, self.applog, self.audit, app.name, record.name, size)
        key = (app.name, record.name)
        self.running[key] = None  # counted against the limits from now on
        self._none_running = trio.Event()
        try:
            if request.await_attach and not await self._await_client(conn, record, life, log):
                return
            await self._prepare_and_run(conn, request, record, life, log)
        finally:
            del self.running[key]
            if not self.running:
                self._none_running.set()

    def _check_host_limit(self) -> None:
        """max_per_host: this node's own count (max_per_app is the store's, over all
        nodes, in create_dyno)."""
        if len(self.running) >= self.config.dynos.max_per_host:
            raise Refused(
                f"this host already runs {len(self.running)} dynos, the most allowed "
                "(dynos.max_per_host); try again later"
            )

    async def _await_client(
        self, conn: FrontConnection, record: DynoRecord, life: DynoLife, log: EventLog
    ) -> bool:
        """A dyno made through the API: name it now, start it when its client arrives on
        the rendezvous port. The front gives up after attach_timeout and closes the
        connection; the slack here only guards against a front that never does."""
        self.applog.heroku(record.app, record.name, "Awaiting client")
        await conn.send(Reserved(record.info()))
        with trio.move_on_after(self.config.rendezvous.attach_timeout + 5):
            with contextlib.suppress(RemoteProtocolError):
                received = await conn.receive()
                if received is not None and isinstance(received[0], Attach):
                    return True
        log.info("no client attached")
        life.complete(
            Exit(status=128), "unclaimed", "Error R13 (Attach error) -> Failed to attach to process"
        )
        return False

    async def _prepare_and_run(
        self,
        conn: FrontConnection,
        request: Run,
        record: DynoRecord,
        life: DynoLife,
        log: EventLog,
    ) -> None:
        request_time = trio.current_time()
        try:
            uid = self.store.app_uid(record.app, *self.config.dynos.uid_range_bounds)
        except StoreError as exc:
            life.crash()
            raise Refused(str(exc)) from None
        try:
            release_dir = await self.releases.ensure(record.app, record.release_version)
        except ReleaseUnavailable as exc:
            log.error("dyno failed to start error=%s", exc)
            life.crash()
            raise Refused(f"{record.name} failed to start: {exc}") from None
        command: str | None = record.command if request.command else None
        if request.subsystem is not None:
            command = subsystem_command(self.config, request.subsystem)
        spec = DynoSpec(
            app=record.app,
            name=record.name,
            command=command,
            config_vars=self.store.get_config(record.app) | request.env,
            pty=request.pty if request.attach else None,
            release_dir=release_dir,
            size=record.size,
            uid=uid,
        )
        log.info(
            "dyno starting release=v%d size=%s attach=%s command=%r",
            record.release_version, record.size, request.attach, record.command,
        )  # fmt: skip
        self.applog.heroku(record.app, record.name, applog.starting(record.command))
        stdio = Stdio(spec.pty, request.attach, request.merge_output, request.subsystem is not None)
        try:
            launched = await self.sandbox.start(spec, stdio.child)
        except SandboxError as exc:
            stdio.close()
            log.error("dyno failed to start error=%s", exc)
            life.crash()
            raise Refused(f"{record.name} failed to start") from None
        except BaseException:
            stdio.close()
            raise
        stdio.close_child()
        try:
            await self._supervise(
                conn, request, record, spec, launched, stdio, life, log, request_time
            )
        finally:
            with trio.CancelScope(shield=True):
                await self.sandbox.remove(launched)

    async def _supervise(
        self,
        conn: FrontConnection,
        request: Run,
        record: DynoRecord,
        spec: DynoSpec,
        launched: Launched,
        stdio: Stdio,
        life: DynoLife,
        log: EventLog,
        request_time: float,
    ) -> None:
        """Hand the running dyno's stdio to the front, and see it to its end."""
        attach = request.attach
        dyno = RunningDyno(launched, spec, stdio)
        process = dyno.process
        metrics.DYNO_START_SECONDS.observe(trio.current_time() - request_time)
        metrics.DYNO_STARTS.labels(spec.app, spec.size).inc()
        running = metrics.DYNOS_RUNNING.labels(spec.app, spec.size)
        running.inc()
        self.audit.event("dyno_start", app=spec.app, dyno=spec.name, size=spec.size,
                         command=spec.command, attached=attach, pid=process.pid)  # fmt: skip
        self.running[(spec.app, spec.name)] = dyno
        result = "exited"
        try:
            # Up before the client hears of it, so what it asks next already says so.
            life.up(process.pid, start_time(process.pid) or 0)
            info = replace(record, state=str(State.UP), updated_at=time.time()).info()
            try:
                await conn.send(Started(info), stdio.front)
            finally:
                stdio.close_front()
            log.info("dyno up pid=%d", process.pid)
            async with trio.open_nursery() as nursery:
                if attach:
                    grace = SUBSYSTEM_GRACE if request.subsystem else 0.0
                    nursery.start_soon(self._follow_front, conn, dyno, log, grace)
                else:
                    dyno.detached = True  # but it ends with its command, as on Heroku
                    nursery.start_soon(dyno.capture_output, self.applog)
                sftp_log = trio.Event()
                if stdio.audit is not None:
                    where = {"app": spec.app, "dyno": spec.name, "conn": request.connection}
                    nursery.start_soon(
                        _audit_then_set, stdio.audit, self.audit, log, where, sftp_log
                    )
                else:
                    sftp_log.set()
                with trio.move_on_after(self.config.dynos.max_lifetime) as lifetime:
                    with dyno.stop_scope:
                        await process.wait()
                if lifetime.cancelled_caught:
                    result = "cycled"
                    log.info("dyno cycled (max_lifetime)")
                    self.applog.heroku(spec.app, spec.name, "Cycling")
                    await self._stop(dyno)
                elif dyno.stop_scope.cancelled_caught:
                    result = "stopped"
                    log.info("dyno stopped (run:stop)")
                    await self._stop(dyno)
                dyno.end_group()
                # Let the logs take what the dyno wrote last (all writers are gone now).
                with trio.move_on_after(DRAIN_AFTER_EXIT):
                    if dyno.detached:
                        await dyno.output_done.wait()
                    await sftp_log.wait()
                nursery.cancel_scope.cancel()
            returncode = dyno.exit_status()
        except BaseException:
            with trio.CancelScope(shield=True):
                await dyno.stop(grace=1)
                exit = Exit.from_returncode(dyno.exit_status())
                self._ended(life, launched, exit, "stopped", log)
            raise
        finally:
            running.dec()
            dyno.end_group()
            dyno.ended.set()
            stdio.close()
        exit = Exit.from_returncode(returncode)
        self._ended(life, launched, exit, result, log)
        if attach:
            # If the client is gone, the record still says how the dyno ended.
            with contextlib.suppress(OSError):
                await conn.send(Exited(status=exit.status, signal=exit.signal))

    def _ended(
        self, life: DynoLife, launched: Launched, exit: Exit, result: str, log: EventLog
    ) -> None:
        """Close the dyno's record and log its end, before the client hears of it, so that
        what a client sees next (run:list, logs, usage) already holds it."""
        life.complete(exit, result, *self.sandbox.end_reason(launched))
        log.info("dyno ended status=%s signal=%s result=%s", exit.status, exit.signal, result)

    async def _follow_front(
        self, conn: FrontConnection, dyno: RunningDyno, log: EventLog, grace: float
    ) -> None:
        """Relay the front's signal requests. When the front hangs up, so does the dyno
        (as the kernel does for sshd); what survives it runs on detached, its output
        going to the app log. With a `grace` (a subsystem), the dyno has that long to end
        by itself first: sftp-server sees the end of its input and logs its open files."""
        await conn.relay_signals(
            log, lambda name: dyno.signal_foreground(signal.Signals["SIG" + name])
        )
        with trio.move_on_after(grace):
            await dyno.process.wait()
        log.info("client gone, SIGHUP")
        dyno.hang_up()
        await dyno.capture_output(self.applog)

    # -- stopping ----------------------------------------------------------------------

    async def _stop(self, dyno: RunningDyno) -> None:
        """SIGTERM, `stop_grace`, then SIGKILL, each step in the app log as Heroku logs it."""
        grace = self.config.dynos.stop_grace
        app, name = dyno.spec.app, dyno.spec.name
        self.applog.heroku(app, name, "Stopping all processes with SIGTERM")
        if not await dyno.stop(grace):
            self.applog.heroku(
                app,
                name,
                "Error R12 (Exit timeout) -> At least one process failed to exit within "
                f"{grace} seconds of SIGTERM",
                "Stopping all processes with SIGKILL",
            )

    def stop(self, app: str, name: str) -> bool:
        """run:stop: the dyno's own task stops it; False if no such dyno runs here."""
        dyno = self.running.get((app, name))
        if dyno is None:
            return False
        dyno.stop_scope.cancel()
        return True

    async def stop_all(self) -> None:
        """At shutdown: stop every dyno still running (SIGTERM, stop_grace, SIGKILL, with
        Heroku's log lines), and wait for them to end."""
        for dyno in self.running.values():
            if dyno is not None:
                if not dyno.detached:
                    # As on a disconnect first, so that what does not trap SIGHUP ends
                    # by it, whichever of the front's hang-up and this comes first.
                    dyno.hang_up()
                dyno.stop_scope.cancel()
        if self.running:
            _logger.info("stopping %d dynos", len(self.running))
        with trio.move_on_after(self.config.dynos.stop_grace + 5):
            await self._none_running.wait()


async def _audit_then_set(
    fd: int, audit: AuditLog, log: EventLog, where: dict[str, str], done: trio.Event
) -> None:
    await audit_sftp_log(fd, audit, log, **where)
    done.set()
