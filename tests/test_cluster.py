"""Three gateway nodes behind HAProxy on one PostgreSQL (tests/cluster.py): each bullet
of docs/scale-out.md's "Behaviour across nodes", with the real OpenSSH client, the real
heroku CLI and real servers, all on loopback.

The tests share one cluster and run in this order; the last two kill a node and
restart PostgreSQL, and leave the cluster as they found it. About three minutes.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.cluster import CLIENT, Cluster, Node, start_cluster
from tests.conftest import REPO, wait_until
from tests.postgres import PostgresServer
from tests.test_heroku_cli import Heroku, heroku_bin  # noqa: F401 (the fixture)

SESSIONS = 300


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    postgres = PostgresServer.create()
    try:
        running = start_cluster(tmp_path_factory.mktemp("cluster"), postgres)
        try:
            yield running
        finally:
            running.stop()
    finally:
        postgres.destroy()


def _names(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout.decode().strip()


def _detached(node: Node, app: str, command: str) -> str:
    """Start a detached dyno on `node`; its name."""
    started = node.ssh(app, "run:detached", command)
    assert started.returncode == 0, started.stderr
    return re.search(rb"up, (run\.\d+)", started.stdout).group(1).decode()  # type: ignore[union-attr]


def _running(node: Node, app: str) -> list[str]:
    listed = node.ssh(app, "run:list", "--json")
    assert listed.returncode == 0, listed.stderr
    return [dyno["name"] for dyno in json.loads(listed.stdout)]


def test_300_sessions_through_haproxy_land_on_every_node_with_unique_numbers(
    cluster: Cluster,
) -> None:
    app = cluster.new_app()

    def session(_: int) -> str:
        return _names(cluster.ssh(app, "echo $DYNO"))

    # Six at a time (max_per_app is 10): 2 cores run three nodes, HAProxy and PostgreSQL.
    with ThreadPoolExecutor(6) as pool:
        names = list(pool.map(session, range(SESSIONS)))
    assert sorted(names, key=lambda n: int(n[4:])) == [f"run.{i}" for i in range(1, SESSIONS + 1)]
    # Each node's audit trail: the dynos it ran, and the client's own address (127.0.0.9,
    # not HAProxy's 127.0.0.1) from the PROXY header.
    per_node = Counter()
    for name, node in cluster.nodes.items():
        events = node.audit()
        started = [e for e in events if e["event"] == "dyno_start" and e["app"] == app]
        per_node[name] = len(started)
        auths = [e for e in events if e["event"] == "auth" and e.get("app") == app]
        assert auths and {e["source"] for e in auths} == {CLIENT}
    assert sum(per_node.values()) == SESSIONS
    assert all(per_node[name] > 0 for name in cluster.nodes), per_node


def test_max_per_app_holds_across_all_nodes_together(cluster: Cluster) -> None:
    app = cluster.new_app()
    for i in range(10):  # max_per_app = 10, spread over the three nodes
        node = list(cluster.nodes.values())[i % 3]
        _detached(node, app, "sleep 300")
    for node in cluster.nodes.values():
        refused = node.ssh(app, "run:detached", "sleep 300")
        assert refused.returncode == 1
        assert b"already runs 10 one-off dynos, the most allowed" in refused.stderr
    # A stop anywhere frees a slot everywhere.
    running = _running(cluster.nodes["c"], app)
    assert len(running) == 10
    for name in running:
        assert cluster.nodes["c"].ssh(app, "run:stop", name).returncode == 0
    assert wait_until(lambda: _running(cluster.nodes["b"], app) == [], 20)
    assert cluster.nodes["a"].ssh(app, "echo $DYNO").stdout == b"run.11\n"


def test_a_release_made_on_one_node_runs_on_nodes_that_never_saw_it(cluster: Cluster) -> None:
    app = cluster.new_app({"hello.txt": "made on a\n"})  # releases:create on node a
    b, c = cluster.nodes["b"], cluster.nodes["c"]
    assert not (b.state_dir / "releases" / app).exists()
    assert b.ssh(app, "cat hello.txt").stdout == b"made on a\n"
    # Four first dynos at once on node c: one fetch, the others wait for it.
    with ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(lambda _: c.ssh(app, "cat hello.txt").stdout, range(4)))
    assert outputs == [b"made on a\n"] * 4
    for node in (b, c):
        fetched = [line for line in node.log if f"release fetched app={app} release=v1" in line]
        assert len(fetched) == 1, fetched
        assert (node.state_dir / "releases" / app / "v1" / "hello.txt").read_text() == "made on a\n"


def test_a_stop_on_one_node_stops_a_dyno_on_another(cluster: Cluster) -> None:
    app = cluster.new_app()
    a, b, c = cluster.nodes.values()
    first = _detached(a, app, "sleep 300")
    second = _detached(a, app, "sleep 300")
    # run:stop on node c (SSH), and gateway ps:stop on node b (its manager socket).
    stopped = c.ssh(app, "run:stop", first)
    assert stopped.stdout == f"Stopping {first} dyno on {app}... done\n".encode()
    assert b.cli("ps:stop", app, second).stdout == f"Stopping {second} dyno on {app}... done\n"
    assert wait_until(lambda: _running(c, app) == [], 15)
    log = b.cli("logs", app).stdout
    for name in (first, second):
        assert f"heroku[{name}]: Stopping all processes with SIGTERM" in log
        assert f"heroku[{name}]: State changed from up to complete" in log
    assert any(f"stop requested app={app} dyno={first} by=c" in line for line in a.log)
    # A dyno that runs nowhere: refused as on one node.
    refused = c.ssh(app, "run:stop", first)
    assert refused.returncode == 1 and b"no running dyno" in refused.stderr


def test_every_node_answers_the_same_and_a_tail_follows_another_nodes_dyno(
    cluster: Cluster,
) -> None:
    app = cluster.new_app()
    a, b, c = cluster.nodes.values()
    name = _detached(a, app, "for i in $(seq 1 40); do echo line $i; sleep 0.1; done; sleep 30")
    tail = subprocess.Popen(
        c.relay_argv(app, "run:logs", "-p", name, "--tail"), stdout=subprocess.PIPE, cwd=REPO
    )
    try:
        assert tail.stdout is not None
        seen = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "line 40" not in "".join(seen[-1:]):
            seen.append(tail.stdout.readline().decode())
    finally:
        tail.kill()
        tail.wait()
    lines = [
        int(m.group(1)) for m in (re.search(r"app\[run\.\d+\]: line (\d+)", s) for s in seen) if m
    ]
    assert lines == list(range(1, 41)), seen
    # run:list, gateway ps, run:logs -p, usage and the API: the same from every node.
    listings = {n.name: n.ssh(app, "run:list", "--json").stdout for n in (a, b, c)}
    assert len(set(listings.values())) == 1 and json.loads(listings["a"])[0]["name"] == name
    assert len({n.cli("ps", app, "--json").stdout for n in (a, b, c)}) == 1
    logs = {n.ssh(app, "run:logs", "-p", name, "-n", "5").stdout for n in (a, b, c)}
    assert len(logs) == 1 and b"line 40" in logs.pop()
    assert c.ssh(app, "run:stop", name).returncode == 0
    assert wait_until(lambda: _running(b, app) == [], 15)
    usages = {n.cli("usage", app, "--json").stdout for n in (a, b, c)}
    assert len(usages) == 1 and json.loads(usages.pop())[0]["dynos"] == 1


def test_heroku_run_through_the_api_attaches_at_the_rendezvous_of_the_node_holding_it(
    cluster: Cluster,
    heroku_bin: Path,  # noqa: F811
) -> None:
    a = cluster.nodes["a"]
    app = cluster.new_app()
    token = a.cli("tokens:create", "--app", app).stdout.strip()
    heroku = Heroku(a, heroku_bin, app, token)
    env = dict(heroku.env, HEROKU_HOST=f"http://127.0.0.1:{cluster.ports.lb_api}")
    env["HEROKU_PARTICLEBOARD_URL"] = env["HEROKU_HOST"]
    env["NODE_EXTRA_CA_CERTS"] = str(a.keys / "rendezvous-ca.pem")  # the nodes' shared CA

    def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [str(heroku_bin), *args], env=env, stdin=subprocess.DEVNULL, capture_output=True,
            timeout=120,
        )  # fmt: skip

    for i in range(4):  # HAProxy's round robin spreads the CLI's requests
        result = run("run", "-a", app, "--", f"echo hi {i} from $DYNO")
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"hi {i} from run.{i + 1}\n".encode()
    # Each dyno was reserved by the API of one node, and attached at that node's own
    # rendezvous (reached through its public_host, 127.0.0.1X, HAProxy's frontend for it).
    served = {}
    for node in cluster.nodes.values():
        for line in node.log:
            if f"api dyno created app={app}" in line:
                dyno = re.search(r"dyno=(run\.\d+)", line).group(1)  # type: ignore[union-attr]
                assert any(
                    "rendezvous attached" in other and f"dyno={dyno}" in other
                    and f"app={app}" in other for other in node.log
                ), dyno  # fmt: skip
                served[dyno] = node.name
    assert sorted(served) == ["run.1", "run.2", "run.3", "run.4"]
    assert len(set(served.values())) >= 2, served
    # logs through the API: the log session is read where it was made (logplex_url
    # names that node's public_host).
    for _ in range(3):
        logs = run("logs", "-a", app, "-n", "50")
        assert logs.returncode == 0, logs.stderr
        assert b"heroku[run.1]: Awaiting client" in logs.stdout
    # ps and ps:stop through the API, whichever node answers.
    detached = run("run:detached", "-a", app, "--", "sleep 300")
    assert detached.returncode == 0, detached.stderr
    assert "run.5 (Standard-1X): up" in run("ps", "-a", app).stdout.decode()
    assert run("ps:stop", "run.5", "-a", app).returncode == 0
    assert wait_until(lambda: "No dynos on" in run("ps", "-a", app).stdout.decode(), 20)


def test_gateway_nodes_and_the_agent_check_tell_each_nodes_room(cluster: Cluster) -> None:
    a = cluster.nodes["a"]
    app = cluster.new_app()
    _detached(a, app, "sleep 300")
    listed = json.loads(a.cli("nodes", "--json").stdout)
    assert [(n["name"], n["state"], n["capacity"]) for n in listed] == [
        ("a", "up", 200), ("b", "up", 200), ("c", "up", 200)
    ]  # fmt: skip
    assert all(n["seconds_since_heartbeat"] < 3 for n in listed)
    assert [n["public_host"] for n in listed] == ["127.0.0.12", "127.0.0.13", "127.0.0.14"]
    assert listed[0]["dynos"] == 1
    table = a.cli("nodes").stdout.splitlines()
    assert table[0].split() == ["NODE", "STATE", "HEARTBEAT", "DYNOS", "CAPACITY", "PUBLIC", "HOST"]
    # max_per_host 200: one dyno leaves 99% on a, 100% on the others; HAProxy took it.
    assert a.agent() == "up ready 99%\n"
    assert cluster.nodes["b"].agent() == "up ready 100%\n"
    assert wait_until(
        lambda: {r["svname"]: r["weight"] for r in cluster.stat() if r["pxname"] == "ssh"}
        .get("a") == "99", 5
    ), cluster.stat()  # fmt: skip
    assert a.ssh(app, "run:stop", _running(a, app)[0]).returncode == 0


def test_a_node_killed_with_kill_9_is_taken_out_and_its_dynos_closed(cluster: Cluster) -> None:
    a, b, c = cluster.nodes.values()
    app = cluster.new_app()
    on_a = [_detached(a, app, "sleep 300") for _ in range(2)]
    on_b = _detached(b, app, "sleep 300")
    killed = time.monotonic()
    a.kill()
    # HAProxy's checks take it out: every new session lands on b or c.
    assert wait_until(lambda: cluster.servers_up("ssh") == {"b", "c"}, 10), cluster.stat()
    for _ in range(10):
        assert cluster.ssh(app, "true").returncode == 0
    # Within dead_after (4) plus one heartbeat (1), a survivor closes a's dynos as crashed,
    # in the app log, and frees their max_per_app slots; b's keeps running.
    assert wait_until(lambda: sorted(_running(c, app)) == [on_b], 10)
    assert time.monotonic() - killed < 4 + 1 + 2  # and one second of slack for the check
    log = c.cli("logs", app).stdout
    for name in on_a:
        assert f"heroku[{name}]: State changed from up to crashed" in log
    listed = {n["name"]: n["state"] for n in json.loads(c.cli("nodes", "--json").stdout)}
    assert listed == {"a": "dead", "b": "up", "c": "up"}
    closers = [
        e for n in (b, c) for e in n.audit()
        if e["event"] == "dyno_end" and e.get("app") == app and e.get("node") == "a"
    ]  # fmt: skip
    assert sorted(e["dyno"] for e in closers) == sorted(on_a)
    # It comes back: up again, its leftovers gone, and HAProxy sends it sessions again.
    a.start()
    assert wait_until(lambda: cluster.servers_up("ssh") == {"a", "b", "c"}, 15), cluster.stat()
    assert not list((a.state_dir / "dynos").iterdir())
    assert a.ssh(app, "echo back on $DYNO").returncode == 0
    assert c.ssh(app, "run:stop", on_b).returncode == 0


def test_postgresql_restarted_under_load(cluster: Cluster) -> None:
    a, b, c = cluster.nodes.values()
    app = cluster.new_app()
    ticks = "i=0; while [ $i -lt 100 ]; do echo tick $i; i=$((i+1)); sleep 0.1; done"
    detached = _detached(b, app, ticks)
    attached = subprocess.Popen(
        cluster.ssh_argv(app, "for i in $(seq 1 60); do echo a$i; sleep 0.1; done"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    # Sessions keep coming, two at a time, through the restart: each works or is told.
    outcomes: list[tuple[float, int, bytes, bytes]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            done = cluster.ssh(app, "echo ok", timeout=30)
            outcomes.append((time.monotonic(), done.returncode, done.stdout, done.stderr))

    workers = [threading.Thread(target=load) for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(1)
        cluster.postgres.stop()
        down_from = time.monotonic()
        time.sleep(3)
        cluster.postgres.start()
        back = time.monotonic()
        # Without restarting any gateway: sessions work again within seconds.
        assert wait_until(lambda: cluster.ssh(app, "echo ok").stdout == b"ok\n", 10)
        working_again = time.monotonic() - back
    finally:
        stop.set()
        for worker in workers:
            worker.join(60)
    out, err = attached.communicate(timeout=60)
    assert attached.returncode == 0, err
    assert out == b"".join(f"a{i}\n".encode() for i in range(1, 61))
    assert working_again < 10
    told = [o for o in outcomes if o[1] != 0]
    assert told, "no session ran into the outage"
    for _, status, _, stderr in told:
        # Refused at authentication (255, the disconnect message), or, when the server
        # went away between authentication and the dyno's start, by the manager (1).
        assert status in (1, 255), stderr
        assert b"the gateway's database is unavailable; try again in a moment" in stderr, stderr
    assert any(at > down_from and status == 0 for at, status, _, _ in outcomes)

    # The detached dyno's output during the outage waited on its node and was written.
    def logged() -> list[int]:
        text = a.cli("logs", app, "-p", detached, "-n", "200").stdout
        return [int(x) for x in re.findall(r"\]: tick (\d+)", text)]

    assert wait_until(lambda: logged() == list(range(100)), 20), logged()
    assert wait_until(lambda: _running(c, app) == [], 20)
