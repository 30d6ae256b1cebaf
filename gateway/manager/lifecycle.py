"""A dyno's record as it moves through its states: every change is checked against
core/dyno.py's table, written to the store, said in the app log as Heroku says it, and
counted; nothing else writes a dyno's state."""

from __future__ import annotations

from gateway.audit import AuditLog
from gateway.core import applog
from gateway.core.dyno import Exit, State, transition
from gateway.manager import metrics
from gateway.manager.applog import AppLog
from gateway.store import Store


class DynoLife:
    def __init__(
        self,
        store: Store,
        log: AppLog,
        audit: AuditLog,
        app: str,
        name: str,
        size: str,
        state: State = State.STARTING,
    ) -> None:
        self.store, self.applog, self.audit = store, log, audit
        self.app, self.name, self.size = app, name, size
        self.state = state

    def up(self, pid: int, started: int) -> None:
        """The process runs (`pid`, started at `started` clock ticks, for recovery after
        a crash). Written in order with the app log: a dyno that starts while the
        database is away runs, and its record follows when the database is back."""
        old = self.state
        self._to(State.UP)
        app, name = self.app, self.name
        self.applog.in_order(
            f"app={app} dyno={name} process",
            lambda: self.store.set_dyno_process(app, name, pid, started),
        )
        self.applog.in_order(
            f"app={app} dyno={name} state", lambda: self.store.set_dyno_state(app, name, State.UP)
        )
        self.applog.heroku(self.app, self.name, applog.state_changed(old, State.UP))

    def complete(self, exit: Exit, result: str, *reasons: str) -> None:
        """The command ended (or was ended): `reasons` are Heroku's error lines before the
        exit line (R12, R13, R15)."""
        old = self.state
        self._to(State.COMPLETE)
        self.applog.heroku(self.app, self.name, *reasons, applog.exited(exit.shell_status))
        self._close(old, exit, result)

    def crash(self) -> None:
        """It never ran, or its manager died with it: no status is known."""
        old = self.state
        self._to(State.CRASHED)
        self._close(old, Exit(), "crashed")

    def _to(self, new: State) -> None:
        self.state = transition(self.state, new)

    def _close(self, old: State, exit: Exit, result: str) -> None:
        self.applog.heroku(self.app, self.name, applog.state_changed(old, self.state))
        state = self.state
        # After the app log lines before it; while the database is away, when it is back
        # (if this node's manager stops first, its next start closes it as crashed).
        self.applog.in_order(
            f"app={self.app} dyno={self.name} record",
            lambda: self.store.end_dyno(self.app, self.name, state, exit.status, exit.signal),
        )
        metrics.DYNO_ENDS.labels(self.app, self.size, result).inc()
        self.audit.event(
            "dyno_end", app=self.app, dyno=self.name, size=self.size, result=result,
            exit_status=exit.status, exit_signal=exit.signal,
        )  # fmt: skip
