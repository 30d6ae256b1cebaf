"""Several nodes against one: session start through HAProxy and PostgreSQL next to a
single node on SQLite, sessions per second with 1, 2 and 3 nodes, and the database's
statements per session start. Side by side in one run, on this machine.

    .venv/bin/python bench/cluster.py [--fresh N] [--execs N] [--rate-seconds S]

Needs PostgreSQL and HAProxy (Debian packages; `./dev test` installs them). Starts the
same processes as the tests (tests/cluster.py: three nodes on 127.0.0.2-4, HAProxy with
contrib/haproxy/haproxy.cfg, every listener taking PROXY v2; PostgreSQL with
pg_stat_statements) and a single node on SQLite (tests/conftest.py), all with the
process sandbox, then measures:

- session start: `ssh host true` on fresh connections (the OpenSSH client), and `true`
  on exec channels of one asyncssh connection (no key exchange: the dyno's own start),
  alternating between the single node and the cluster; the added latency is the
  difference of the medians;
- sessions per second: 6 clients making `ssh host true` sessions for --rate-seconds,
  through HAProxy with 1, 2 and 3 nodes enabled (HAProxy's admin socket), and on the
  single node. On 2 cores more nodes add no capacity: this shows what coordinating
  costs, not how far it scales;
- statements per session start: pg_stat_statements' calls over the sessions of the
  1-node rate run, less the same time idle (heartbeats), per session.

Prints a table and writes bench/results/cluster.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg

from bench.util import median, say
from tests.cluster import Cluster, start_cluster
from tests.conftest import Gateway, _gateway
from tests.postgres import PostgresServer

CLIENTS = 6


def fresh_sessions(argv: list[str]) -> float:
    """Seconds for one `ssh host true` on a fresh connection."""
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"session failed: {done.stderr.decode()}")
    return time.perf_counter() - started


async def exec_sessions(host: str, port: int, app: str, key: Path, count: int) -> list[float]:
    """Seconds for `true` on an exec channel, `count` times on one connection."""
    import asyncssh

    times = []
    async with asyncssh.connect(
        host, port, username=app, client_keys=[str(key)], known_hosts=None,
        kex_algs=["curve25519-sha256"],
    ) as conn:  # fmt: skip
        for _ in range(count + 1):
            started = time.perf_counter()
            result = await conn.run("true")
            if result.exit_status != 0:
                raise RuntimeError(f"exec failed: {result.stderr!r}")
            times.append(time.perf_counter() - started)
    return times[1:]  # the first warms up


def rate(argv: list[str], seconds: float) -> tuple[float, int]:
    """Sessions per second with CLIENTS clients looping for `seconds`; and how many."""
    done = [0] * CLIENTS
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        while time.monotonic() < stop:
            if subprocess.run(argv, capture_output=True, timeout=60).returncode == 0:
                done[i] += 1

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.monotonic() - started), sum(done)


def enable_nodes(cluster: Cluster, count: int) -> None:
    """Only the first `count` nodes take SSH sessions (HAProxy's admin socket)."""
    import socket

    for i, name in enumerate(cluster.nodes):
        verb = "enable" if i < count else "disable"
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(cluster.stats_socket))
            sock.sendall(f"{verb} server ssh/{name}\n".encode())
            sock.makefile().read()


def statements(url: str) -> tuple[int, int]:
    """pg_stat_statements' calls in this database, and its committed transactions."""
    with psycopg.connect(url, autocommit=True) as conn:
        calls = conn.execute(
            "SELECT COALESCE(SUM(calls), 0) FROM pg_stat_statements"
            " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchone()[0]
        commits = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()[0]
    return int(calls), int(commits)


def reset_statements(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_statements_reset()")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fresh", type=int, default=40, help="fresh-connection sessions each")
    parser.add_argument("--execs", type=int, default=100, help="exec channels each")
    parser.add_argument("--rate-seconds", type=float, default=15, help="seconds per rate run")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="gateway-bench-cluster-"))
    postgres = PostgresServer.create("-c shared_preload_libraries=pg_stat_statements")
    single: Gateway | None = None
    cluster: Cluster | None = None
    results: dict[str, object] = {}
    try:
        cluster = start_cluster(root / "cluster", postgres, max_per_app=50)
        url = cluster.nodes["a"].database_url
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        single = _gateway(root / "single", "max_per_app = 50\n")
        single.start()
        app_c, app_s = cluster.new_app(), single.new_app()
        via_cluster = cluster.ssh_argv(app_c, "true")
        via_single = single.ssh_argv(app_s, "true")

        say(f"session start, fresh connections: {args.fresh} each, alternating")
        fresh_c, fresh_s = [], []
        for _ in range(args.fresh):
            fresh_s.append(fresh_sessions(via_single))
            fresh_c.append(fresh_sessions(via_cluster))
        say(f"session start, exec channels: {args.execs} each")
        exec_s = asyncio.run(
            exec_sessions("127.0.0.1", single.port, app_s, single.client_key, args.execs)
        )
        exec_c = asyncio.run(
            exec_sessions("127.0.0.1", cluster.ports.lb_ssh, app_c, cluster.client_key, args.execs)
        )
        results["start_ms"] = {
            "fresh": {"single": median(fresh_s) * 1000, "cluster": median(fresh_c) * 1000},
            "exec": {"single": median(exec_s) * 1000, "cluster": median(exec_c) * 1000},
        }

        rates: dict[str, float] = {}
        say(f"sessions per second, {CLIENTS} clients, {args.rate_seconds:.0f} s each")
        rates["single (SQLite)"], _ = rate(via_single, args.rate_seconds)
        for count in (1, 2, 3):
            enable_nodes(cluster, count)
            time.sleep(2)  # HAProxy's state settles
            if count == 1:
                reset_statements(url)
                before = statements(url)
                rates["1 node"], sessions = rate(via_cluster, args.rate_seconds)
                busy = statements(url)
                reset_statements(url)
                idle_start = statements(url)
                time.sleep(args.rate_seconds)
                idle = statements(url)
                calls = (busy[0] - before[0]) - (idle[0] - idle_start[0])
                commits = (busy[1] - before[1]) - (idle[1] - idle_start[1])
                results["per_session"] = {
                    "statements": calls / sessions, "transactions": commits / sessions,
                    "sessions": sessions,
                }  # fmt: skip
            else:
                rates[f"{count} nodes"], _ = rate(via_cluster, args.rate_seconds)
        results["sessions_per_second"] = rates
    finally:
        if cluster is not None:
            cluster.stop()
        if single is not None:
            single.stop()
        postgres.destroy()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cluster.json").write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))


def report(results: dict[str, object]) -> str:
    start = results["start_ms"]
    assert isinstance(start, dict)
    lines = [
        "| session start (median) | single node, SQLite | 3 nodes, HAProxy + PostgreSQL | added |",
        "| --- | --- | --- | --- |",
    ]
    for kind, label in (("fresh", "`ssh host true`, fresh connection"),
                        ("exec", "`true` on an open connection")):  # fmt: skip
        row = start[kind]
        lines.append(
            f"| {label} | {row['single']:.1f} ms | {row['cluster']:.1f} ms "
            f"| {row['cluster'] - row['single']:+.1f} ms |"
        )
    lines += ["", "| sessions per second (6 clients) | |", "| --- | --- |"]
    rates = results["sessions_per_second"]
    assert isinstance(rates, dict)
    lines += [f"| {name} | {value:.1f} |" for name, value in rates.items()]
    per = results["per_session"]
    assert isinstance(per, dict)
    lines += [
        "",
        f"Per session start (1 node, {per['sessions']} sessions, heartbeats subtracted): "
        f"{per['statements']:.1f} statements, {per['transactions']:.1f} transactions.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
