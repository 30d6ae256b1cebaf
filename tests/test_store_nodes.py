"""The store's node queries (heartbeats, dead nodes) and the app log's notices, on both
backends (tests/test_store.py's `where`): what the manager's cluster task builds on."""

from __future__ import annotations

import json
import select
import time

import pytest

from gateway.core.agent_check import agent_reply
from gateway.core.applog import LogLine
from gateway.core.dyno import State
from gateway.store.nodes import DEAD, LOG_CHANNEL, STOPPED, UP, node_channel
from tests.test_store import Where, where  # noqa: F401 (the fixture)


def _make_app(where: Where) -> None:  # noqa: F811
    store = where.open("admin")
    store.create_app("shop")
    store.add_release("shop", "0" * 64, 1, 1, {})
    store.close()


def test_heartbeats_list_the_nodes_and_say_when_one_was_declared_dead(
    where: Where,  # noqa: F811
) -> None:
    a, b = where.open("a"), where.open("b")
    assert a.heartbeat("gw-a", 200) is None  # new
    assert b.heartbeat("gw-b", 100) is None
    assert a.heartbeat("gw-a", 200) == UP
    nodes = a.list_nodes()
    assert [(n.name, n.public_host, n.state, n.capacity, n.dynos) for n in nodes] == [
        ("a", "gw-a", UP, 200, 0), ("b", "gw-b", UP, 100, 0)
    ]  # fmt: skip
    assert all(0 <= n.silent_for < 5 for n in nodes)
    assert b.heartbeat("gw-b", 100, STOPPED) == UP
    assert [n.state for n in a.list_nodes()] == [UP, STOPPED]
    assert b.heartbeat("gw-b", 100) == STOPPED  # started again


def test_a_silent_nodes_dynos_are_closed_once_as_crashed(where: Where) -> None:  # noqa: F811
    _make_app(where)
    a, b, c = where.open("a"), where.open("b"), where.open("c")
    for node in (a, b, c):
        node.heartbeat("", 10)
    on_a = [a.create_dyno("shop", "sleep 9", "standard-1x", 1, False, max_running=3)
            for _ in range(2)]  # fmt: skip
    a.set_dyno_state("shop", on_a[0].name, State.UP)
    on_b = b.create_dyno("shop", "sleep 9", "standard-1x", 1, False, max_running=3)
    with pytest.raises(Exception, match="already runs 3"):
        c.create_dyno("shop", "x", "standard-1x", 1, False, max_running=3)
    assert c.close_dead_nodes(dead_after=5) == []  # nobody silent yet
    time.sleep(1.2)
    b.heartbeat("", 10)
    c.heartbeat("", 10)
    closed = c.close_dead_nodes(dead_after=1)
    assert [(d.name, d.state, d.node) for d in closed] == [
        (on_a[0].name, "up", "a"), (on_a[1].name, "starting", "a")
    ]  # fmt: skip
    assert b.close_dead_nodes(dead_after=1) == []  # closed once
    assert {n.name: n.state for n in c.list_nodes()} == {"a": DEAD, "b": UP, "c": UP}
    assert [d.name for d in c.list_dynos("shop", running=True)] == [on_b.name]
    record = c.get_dyno("shop", on_a[0].name)
    assert record is not None and record.state == "crashed" and record.exit_status is None
    # Their slots are free; the node, back, learns it was declared dead.
    c.create_dyno("shop", "x", "standard-1x", 1, False, max_running=3)
    assert a.heartbeat("", 10) == DEAD
    assert {n.name: n.state for n in c.list_nodes()}["a"] == UP


def test_log_range_is_one_nodes_lines_and_notices_name_them(where: Where) -> None:  # noqa: F811
    _make_app(where)
    a, b = where.open("a"), where.open("b")
    listener = b.listener([LOG_CHANNEL, node_channel("b")])
    a.append_log("shop", [LogLine(1.0, "app", "run.1", f"a{i}") for i in range(3)], keep=100)
    b.append_log("shop", [LogLine(2.0, "app", "run.2", "b0")], keep=100)
    history = b.read_log("shop")
    assert [line.message for line in history] == ["a0", "a1", "a2", "b0"]
    assert all(line.id is not None for line in history)
    ids = [line.id for line in history if line.message.startswith("a")]
    got = b.log_range("shop", "a", min(ids), max(ids) + 1)  # type: ignore[type-var]
    assert [line.message for line in got] == ["a0", "a1", "a2"]
    assert b.log_range("shop", "b", min(ids), max(ids)) == []  # type: ignore[type-var]
    if listener is None:
        assert not b.shared  # SQLite: one host, nobody to tell
        return
    a.notify(node_channel("b"), json.dumps({"app": "shop", "dyno": "run.1", "by": "a"}))
    notices = []
    deadline = time.monotonic() + 5
    while len(notices) < 3 and time.monotonic() < deadline:
        select.select([listener.fileno()], [], [], 1)
        notices += listener.receive()
    payloads = [(n.channel, json.loads(n.payload)) for n in notices]
    assert payloads == [
        (LOG_CHANNEL, {"node": "a", "app": "shop", "first": min(ids), "last": max(ids)}),
        (LOG_CHANNEL, {"node": "b", "app": "shop", "first": history[-1].id,
                       "last": history[-1].id}),
        (node_channel("b"), {"app": "shop", "dyno": "run.1", "by": "a"}),
    ]  # fmt: skip
    listener.close()


@pytest.mark.parametrize(
    ("running", "capacity", "draining", "reply"),
    [
        (0, 200, False, "up ready 100%\n"),
        (63, 100, False, "up ready 37%\n"),
        (199, 200, False, "up ready 1%\n"),  # room for one: never 0%, which would drain
        (999, 1000, False, "up ready 1%\n"),
        (200, 200, False, "drain\n"),
        (250, 200, False, "drain\n"),
        (0, 200, True, "drain\n"),
    ],
)
def test_the_agent_check_reply(running: int, capacity: int, draining: bool, reply: str) -> None:
    assert agent_reply(running, capacity, draining) == reply
