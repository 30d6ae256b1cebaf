"""This node among the others sharing one PostgreSQL database (docs/scale-out.md): no
consensus or gossip of our own, only the database and its LISTEN/NOTIFY.

- Heartbeats: every `heartbeat` seconds the node's row in `nodes` is touched (by the
  database's clock); the same tick writes what waited for the database (AppLog.flush).
- Dead nodes: a node silent for `dead_after` seconds is dead; the first node to see it
  closes its dynos as `crashed` (one transaction, so two survivors never both do) and
  says so in each app's log, freeing their `max_per_app` slots. A node reaps only once
  its own heartbeats have gone through for `dead_after` seconds: after an outage of the
  database every node is silent, and none must take the others for dead.
- Requests between nodes: a stop for a dyno another node runs is a NOTIFY on that node's
  channel; the node it names stops it as its own run:stop.
- Tails across nodes: every app log write notifies which rows a node added; a node with
  live readers of that app reads those rows and gives them to its readers.

With SQLite (one host) only the heartbeat runs: `gateway nodes` shows this host.
"""

from __future__ import annotations

import json
import logging

import trio

from gateway.audit import AuditLog
from gateway.config import Config
from gateway.core.agent_check import agent_reply
from gateway.core.applog import state_changed
from gateway.core.dyno import State
from gateway.manager.applog import AppLog
from gateway.manager.supervisor import Supervisor
from gateway.store import Store, StoreUnavailable
from gateway.store.nodes import DEAD, LOG_CHANNEL, STOPPED, UP, node_channel
from gateway.store.records import Listener, Notice

log = logging.getLogger(__name__)


class Cluster:
    def __init__(
        self, config: Config, store: Store, dynos: Supervisor, applog: AppLog, audit: AuditLog
    ) -> None:
        self.config = config
        self.settings = config.cluster
        self.store = store
        self.node = store.node
        self.dynos = dynos
        self.applog = applog
        self.audit = audit
        self.draining = False
        self._channel = node_channel(self.node)

    @property
    def capacity(self) -> int:
        return self.config.dynos.max_per_host

    def agent_reply(self) -> str:
        """This node's answer to HAProxy's agent-check."""
        return agent_reply(len(self.dynos.running), self.capacity, self.draining)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Heartbeats, and (with a shared database) the node's notices, until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._heartbeats)
            if self.store.shared:
                await nursery.start(self._listen)
            task_status.started()

    def stopped(self) -> None:
        """At a clean shutdown (every dyno ended): the node is stopped, not dead."""
        try:
            self.store.heartbeat(self.config.attach_host, self.capacity, STOPPED)
        except StoreUnavailable as exc:
            log.warning("node stop not recorded node=%s error=%s", self.node, exc)

    # -- heartbeats and dead nodes ---------------------------------------------------

    async def _heartbeats(self) -> None:
        healthy_since: float | None = None
        while True:
            self.applog.flush()
            try:
                before = self.store.heartbeat(self.config.attach_host, self.capacity, UP)
                if before is None:
                    log.info("node joined node=%s", self.node)
                elif before == DEAD:
                    log.error(
                        "node was declared dead by another node (silent over dead_after) "
                        "node=%s; its dynos were closed as crashed",
                        self.node,
                    )
                now = trio.current_time()
                if healthy_since is None:
                    healthy_since = now
                if self.store.shared and now - healthy_since >= self.settings.dead_after:
                    self._close_dead_nodes()
            except StoreUnavailable as exc:
                if healthy_since is not None:
                    log.warning("heartbeat failed node=%s error=%s", self.node, exc)
                healthy_since = None
            await trio.sleep(self.settings.heartbeat)

    def _close_dead_nodes(self) -> None:
        for dyno in self.store.close_dead_nodes(self.settings.dead_after):
            log.warning(
                "dyno closed: its node is dead app=%s dyno=%s node=%s state=crashed",
                dyno.app, dyno.name, dyno.node,
            )  # fmt: skip
            self.applog.heroku(dyno.app, dyno.name, state_changed(dyno.state, State.CRASHED))
            self.audit.event(
                "dyno_end", app=dyno.app, dyno=dyno.name, size=dyno.size, result="crashed",
                node=dyno.node, closed_by=self.node,
            )  # fmt: skip

    # -- notices ---------------------------------------------------------------------

    async def _listen(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """LISTEN on this node's channel and the app log's, on a connection of its own,
        made again (each heartbeat) when it breaks. Notices sent while it is broken are
        lost: a stop is asked again, a tail misses those lines (docs/scale-out.md)."""
        started = False
        while True:
            try:
                listener = await trio.to_thread.run_sync(
                    self.store.listener, [self._channel, LOG_CHANNEL]
                )
            except StoreUnavailable as exc:
                log.warning("listen failed node=%s error=%s", self.node, exc)
                listener = None
            if not started:
                task_status.started()
                started = True
            if listener is not None:
                try:
                    await self._receive(listener)
                except StoreUnavailable as exc:
                    log.warning("listen connection lost node=%s error=%s", self.node, exc)
                finally:
                    listener.close()
            await trio.sleep(self.settings.heartbeat)

    async def _receive(self, listener: Listener) -> None:
        log.info("listening node=%s", self.node)
        while True:
            await trio.lowlevel.wait_readable(listener.fileno())
            for notice in listener.receive():
                try:
                    self._handle(notice)
                except StoreUnavailable as exc:
                    log.warning("notice not handled node=%s error=%s", self.node, exc)
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning("bad notice channel=%s error=%r", notice.channel, exc)

    def _handle(self, notice: Notice) -> None:
        payload = json.loads(notice.payload)
        if notice.channel == LOG_CHANNEL:
            app, node = str(payload["app"]), str(payload["node"])
            if node != self.node and self.applog.following(app):
                lines = self.store.log_range(app, node, int(payload["first"]), int(payload["last"]))
                self.applog.relay(app, lines)
        elif notice.channel == self._channel:
            app, dyno, by = str(payload["app"]), str(payload["dyno"]), str(payload["by"])
            if self.dynos.stop(app, dyno):
                log.info("stop requested app=%s dyno=%s by=%s", app, dyno, by)
                self.audit.event("dyno_stop", app=app, dyno=dyno, by=by)
            else:
                log.info("stop for no running dyno app=%s dyno=%s by=%s", app, dyno, by)

    def stop_elsewhere(self, app: str, dyno: str) -> str | None:
        """run:stop of a dyno another node runs: tell that node; its name, or None when
        no other node runs it."""
        if not self.store.shared:
            return None
        record = self.store.get_dyno(app, dyno)
        if record is None or record.ended_at is not None or record.node == self.node:
            return None
        payload = json.dumps({"app": app, "dyno": dyno, "by": self.node})
        self.store.notify(node_channel(record.node), payload)
        return record.node
