"""The multi-node harness: one PostgreSQL, three `gateway serve` nodes on 127.0.0.2, .3
and .4 (each its own state_dir, one keys_dir for all, as docs/scale-out.md says), and
HAProxy from Debian running contrib/haproxy/haproxy.cfg as shipped, its addresses given
in the environment: SSH and the API on 127.0.0.1, each node's rendezvous on 127.0.0.12,
.13 and .14 (the nodes' public_host). Every listener of the nodes takes PROXY v2 only.

A node can be reached past HAProxy through tests/proxy_relay.py (the header as HAProxy
sends it), to put a dyno on a node of the test's choosing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO, Gateway, _client_key, free_port, wait_until
from tests.postgres import PostgresServer

HAPROXY = "/usr/sbin/haproxy"
NODES = {"a": "127.0.0.2", "b": "127.0.0.3", "c": "127.0.0.4"}
# Where HAProxy takes each node's rendezvous and API (log streams): its public_host.
RENDEZVOUS = {"a": "127.0.0.12", "b": "127.0.0.13", "c": "127.0.0.14"}
# The loopback address the test's clients connect from: not HAProxy's, so the nodes can
# only know it from the PROXY header.
CLIENT = "127.0.0.9"


@dataclass(frozen=True)
class Ports:
    """The same on every node (each has its own address), and HAProxy's."""

    ssh: int = field(default_factory=free_port)
    rendezvous: int = field(default_factory=free_port)
    api: int = field(default_factory=free_port)
    agent: int = field(default_factory=free_port)
    lb_ssh: int = field(default_factory=free_port)
    lb_api: int = field(default_factory=free_port)


@dataclass
class Node(Gateway):
    """A gateway node: a Gateway whose listeners are on its own loopback address."""

    name: str = ""
    host: str = ""
    ports: Ports = field(default_factory=Ports)
    database_url: str = ""
    keys: Path = Path()
    cluster_config: str = ""

    def write_config(self) -> None:
        san = json.dumps(["127.0.0.1", "localhost", *RENDEZVOUS.values()])
        p = self.ports
        self.config_path.write_text(
            f'state_dir = "state"\nkeys_dir = "{self.keys}"\n'
            f'database_url = "{self.database_url}"\n'
            f'[ssh]\nlisten = "{self.host}:{p.ssh}"\nproxy_protocol = true\n'
            f'public_host = "127.0.0.1"\npublic_port = {p.lb_ssh}\n{self.ssh_config}'
            f'[rendezvous]\nlisten = "{self.host}:{p.rendezvous}"\nproxy_protocol = true\n'
            f"san = {san}\n"
            f'[api]\nlisten = "{self.host}:{p.api}"\nproxy_protocol = true\n'
            f'[metrics]\nlisten = "{self.host}:{self.metrics_port}"\n'
            f'[dynos]\nsandbox = "process"\n{self.extra_config}'
            f'[cluster]\nnode = "{self.name}"\npublic_host = "{RENDEZVOUS[self.name]}"\n'
            f'heartbeat = 1\ndead_after = 4\nagent_listen = "{self.host}:{p.agent}"\n'
            f"{self.cluster_config}"
        )

    def relay_argv(self, app: str, *command: str, tty: bool = False) -> list[str]:
        """ssh to this node itself, past HAProxy, with the PROXY header it sends."""
        relay = f"{sys.executable} -m tests.proxy_relay {self.host} {self.ports.ssh} {CLIENT}"
        argv = super().ssh_argv(app, *command, tty=tty)
        argv[1:1] = ["-o", f"ProxyCommand={relay}"]
        return argv

    def ssh(  # type: ignore[override]
        self, app: str, *command: str, input: bytes | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            self.relay_argv(app, *command), input=input, capture_output=True, timeout=timeout,
            cwd=REPO,
        )  # fmt: skip

    def kill(self) -> None:
        """kill -9 the node's manager (its front follows through the lifeline)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self.process = None
        wait_until(lambda: self.log_ended.is_set(), 10)

    def audit(self) -> list[dict[str, object]]:
        path = self.state_dir / "audit.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def agent(self) -> str:
        """What HAProxy's agent-check reads from this node."""
        with socket.create_connection((self.host, self.ports.agent), timeout=5) as sock:
            return sock.makefile().read()


@dataclass
class Cluster:
    root: Path
    postgres: PostgresServer
    nodes: dict[str, Node]
    ports: Ports
    client_key: Path
    haproxy: subprocess.Popen[bytes] | None = None

    @property
    def stats_socket(self) -> Path:
        return self.root / "haproxy.sock"

    def start_haproxy(self) -> None:
        p = self.ports
        env = {
            "PATH": os.environ["PATH"],
            **{f"GW_{name.upper()}": host for name, host in NODES.items()},
            "GW_SSH_PORT": str(p.ssh), "GW_RENDEZVOUS_PORT": str(p.rendezvous),
            "GW_API_PORT": str(p.api), "GW_AGENT_PORT": str(p.agent),
            "LB_SSH_BIND": f"127.0.0.1:{p.lb_ssh}", "LB_API_BIND": f"127.0.0.1:{p.lb_api}",
            **{f"LB_RENDEZVOUS_{name.upper()}_BIND": f"{host}:{p.rendezvous}"
               for name, host in RENDEZVOUS.items()},
            **{f"LB_API_{name.upper()}_BIND": f"{host}:{p.api}"
               for name, host in RENDEZVOUS.items()},
            "LB_STATS_SOCKET": str(self.stats_socket),
        }  # fmt: skip
        config = REPO / "contrib" / "haproxy" / "haproxy.cfg"
        with open(self.root / "haproxy.log", "wb") as log:
            self.haproxy = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(config)], env=env, stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        assert wait_until(lambda: self.servers_up("ssh") == {"a", "b", "c"}, 20), self.stat()

    def stat(self) -> list[dict[str, str]]:
        """HAProxy's `show stat`, one dict per proxy and server."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.stats_socket))
            sock.sendall(b"show stat\n")
            text = sock.makefile().read()
        lines = [line for line in text.splitlines() if line]
        header = lines[0].lstrip("# ").split(",")
        return [dict(zip(header, line.split(","), strict=False)) for line in lines[1:]]

    def servers_up(self, backend: str) -> set[str]:
        if not self.stats_socket.exists():  # HAProxy still starting
            assert self.haproxy is not None and self.haproxy.poll() is None, (
                self.root / "haproxy.log"
            ).read_text()
            return set()
        return {
            row["svname"] for row in self.stat()
            if row["pxname"] == backend and row["svname"] in NODES and row["status"] == "UP"
        }  # fmt: skip

    def ssh_argv(self, app: str, *command: str, tty: bool = False) -> list[str]:
        """ssh through HAProxy, from the client address CLIENT."""
        argv = [
            "ssh", "-F", "/dev/null", "-i", str(self.client_key), "-p", str(self.ports.lb_ssh),
            "-b", CLIENT,
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR",
        ]  # fmt: skip
        if tty:
            argv.append("-tt")
        return [*argv, f"{app}@127.0.0.1", *command]

    def ssh(
        self, app: str, *command: str, input: bytes | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            self.ssh_argv(app, *command), input=input, capture_output=True, timeout=timeout
        )

    def new_app(self, files: dict[str, str | bytes] | None = None) -> str:
        return self.nodes["a"].new_app(files)

    def stop(self) -> None:
        if self.haproxy is not None:
            self.haproxy.terminate()
            self.haproxy.wait(10)
            self.haproxy = None
        for node in self.nodes.values():
            node.stop()


def start_cluster(root: Path, postgres: PostgresServer, max_per_app: int = 10) -> Cluster:
    """PostgreSQL's database made, the nodes started one after the other (the first makes
    the shared keys), then HAProxy, once every node is up in its health checks."""
    if not Path(HAPROXY).exists():
        pytest.skip("HAProxy is not installed (apt-get install haproxy; ./dev test does it)")
    url = postgres.create_database()
    ports = Ports()
    keys = root / "keys"
    root.mkdir(parents=True, exist_ok=True)
    client_key = _client_key(root)
    nodes = {}
    for name, host in NODES.items():
        node = Node(
            root=root / name, port=ports.ssh, client_key=client_key, name=name, host=host,
            ports=ports, database_url=url, keys=keys,
            extra_config=f"max_per_app = {max_per_app}\n",
        )  # fmt: skip
        node.root.mkdir(parents=True)
        node.write_config()
        nodes[name] = node
    cluster = Cluster(root, postgres, nodes, ports, client_key)
    try:
        for node in nodes.values():
            node.start()
        cluster.start_haproxy()
    except BaseException:
        cluster.stop()
        raise
    return cluster
