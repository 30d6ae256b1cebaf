"""A real gateway (`gateway serve`) on a loopback port, and real clients to drive it."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from tests.netns import veth_namespace
from tests.postgres import PostgresServer

REPO = Path(__file__).resolve().parent.parent
SAMPLE_APP = REPO / "contrib" / "sample-app"
_names = itertools.count(1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_slug(path: Path, files: dict[str, str | bytes], prefix: str = "") -> Path:
    """A tar.gz holding `files` (name -> content), optionally under `prefix` (`./app/`)."""
    source = path.with_suffix(".src")
    for name, content in files.items():
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content.encode() if isinstance(content, str) else content)
    with tarfile.open(path, "w:gz") as tar:
        for child in sorted(source.iterdir()):
            tar.add(child, arcname=prefix + child.name)
    shutil.rmtree(source)
    return path


@dataclass
class Gateway:
    root: Path
    port: int
    client_key: Path
    rendezvous_port: int = field(default_factory=lambda: free_port())
    api_port: int = field(default_factory=lambda: free_port())
    metrics_port: int = field(default_factory=lambda: free_port())
    # HAProxy's agent-check, served with database_url: a port of its own, not 9465.
    agent_port: int = field(default_factory=lambda: free_port())
    extra_config: str = ""  # appended to the [dynos] table
    top_config: str = ""  # top-level keys, such as database_url = "..."
    ssh_config: str = ""  # appended to the [ssh] table
    rendezvous_config: str = ""  # appended to the [rendezvous] table
    process: subprocess.Popen[bytes] | None = None
    # What `gateway serve` is started through (such as systemd-socket-activate ...).
    launcher: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    # Set once the running gateway's stderr has reached its end (all of it is in `log`).
    log_ended: threading.Event = field(default_factory=threading.Event)

    @property
    def config_path(self) -> Path:
        return self.root / "gateway.toml"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def write_config(self) -> None:
        self.config_path.write_text(
            f'state_dir = "state"\nkeys_dir = "keys"\n{self.top_config}'
            f'[ssh]\nlisten = "127.0.0.1:{self.port}"\n{self.ssh_config}'
            f'[rendezvous]\nlisten = "127.0.0.1:{self.rendezvous_port}"\n{self.rendezvous_config}'
            f'[api]\nlisten = "127.0.0.1:{self.api_port}"\n'
            f'[metrics]\nlisten = "127.0.0.1:{self.metrics_port}"\n'
            f'[cluster]\nagent_listen = "127.0.0.1:{self.agent_port}"\n'
            f'[dynos]\nsandbox = "process"\n{self.extra_config}'
        )

    def cli(
        self, *args: str, check: bool = True, input: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "--config", str(self.config_path), *args],
            capture_output=True,
            input=input.decode() if input is not None else None,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"gateway {' '.join(args)} failed: {result.stderr}")
        return result

    def start(self) -> None:
        ready = threading.Event()
        self.log_ended = ended = threading.Event()
        argv = [sys.executable, "-m", "gateway", "--config", str(self.config_path), "serve"]
        self.process = subprocess.Popen(
            [*self.launcher, *argv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

        def read(stream: object = self.process.stderr) -> None:
            for raw in stream:  # type: ignore[attr-defined]
                line = raw.decode(errors="replace").rstrip()
                self.log.append(line)
                if "SSH listening on" in line:
                    ready.set()
            ended.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(30):
            self.stop()
            raise AssertionError("gateway did not start:\n" + "\n".join(self.log))

    def stop(self) -> None:
        if self.process is None:
            return
        (self.root / "gateway.log").write_text("\n".join(self.log) + "\n")
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def ssh_argv(
        self, app: str, *command: str, key: Path | None = None, tty: bool = False
    ) -> list[str]:
        argv = [
            "ssh", "-F", "/dev/null",
            "-i", str(key or self.client_key),
            "-p", str(self.port),
            "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes",
            "-o", "LogLevel=ERROR",
        ]  # fmt: skip
        if tty:
            argv.append("-tt")
        return [*argv, f"{app}@127.0.0.1", *command]

    def ssh(
        self,
        app: str,
        *command: str,
        input: bytes | None = None,
        key: Path | None = None,
        timeout: float = 60,
        stdin: object = None,
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            self.ssh_argv(app, *command, key=key),
            input=input,
            stdin=stdin if input is None else None,
            capture_output=True,
            timeout=timeout,
        )

    def connect(self, app: str, **options: object) -> Any:
        """An asyncssh client connection to `app` with the test key (use with async with)."""
        return asyncssh.connect(
            "127.0.0.1",
            self.port,
            username=app,
            client_keys=[str(self.client_key)],
            known_hosts=None,
            **options,
        )

    def new_app(self, files: dict[str, str | bytes] | None = None, release: bool = True) -> str:
        """A fresh app with the test client's key and (unless told not to) one release."""
        name = f"app-{os.getpid() % 10000}-{next(_names)}"
        self.cli("apps:create", name)
        self.cli("keys:add", name, str(self.client_key) + ".pub")
        if release:
            slug = make_slug(self.root / f"{name}.tgz", files or {"hello.txt": "hello\n"})
            self.cli("releases:create", name, str(slug))
        return name


def _client_key(directory: Path, name: str = "client") -> Path:
    key = directory / name
    if not key.exists():
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)], check=True
        )
    return key


def _gateway(root: Path, extra_config: str = "") -> Gateway:
    root.mkdir(parents=True, exist_ok=True)
    gw = Gateway(
        root=root, port=free_port(), client_key=_client_key(root), extra_config=extra_config
    )
    gw.write_config()
    return gw


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One gateway shared by the tests that do not restart it; each test uses its own app."""
    gw = _gateway(tmp_path_factory.mktemp("gw"))
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture
def own_gateway(tmp_path: Path) -> Iterator[Gateway]:
    """A gateway of the test's own, for tests that restart or reconfigure it."""
    gw = _gateway(tmp_path / "gw")
    yield gw
    gw.stop()


@pytest.fixture
def reachable_gateway() -> Iterator[Gateway]:
    """A gateway of the test's own in a directory every user can enter (pytest's own
    tmp dirs are 0700), so that only the gateway's modes keep other users out."""
    root = Path(tempfile.mkdtemp(prefix="gw-reachable-", dir="/tmp"))
    root.chmod(0o755)
    gw = _gateway(root / "gw")
    gw.root.chmod(0o755)
    yield gw
    gw.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session; each test makes its own database in it."""
    server = PostgresServer.create()
    yield server
    server.destroy()


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of the test's own, for tests that stop and restart it."""
    server = PostgresServer.create()
    yield server
    server.destroy()


def pids_with(marker: str, client: subprocess.Popen[bytes] | None = None) -> list[int]:
    """Processes whose command line holds `marker`, other than the ssh client itself."""
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split() if client is None or int(pid) != client.pid]


def wait_until(predicate: object, timeout: float, interval: float = 0.05) -> bool:
    """For tests only: poll `predicate` until true or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return bool(predicate())  # type: ignore[operator]


@dataclass
class NetnsHost:
    """A host of the test's own: a network namespace joined to this one by a veth pair,
    with addresses from 198.18.0.0/15 (for benchmarks and tests, RFC 2544). Traffic to it
    stays on this machine."""

    name: str
    address: str  # the test host's
    gateway: str  # this host's end of the pair (the test host's default route)

    def run(self, *argv: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        """A process inside the test host's namespace."""
        return subprocess.Popen(["ip", "netns", "exec", self.name, *argv], **kwargs)

    def serve_once(self, reply: bytes) -> tuple[int, subprocess.Popen[bytes]]:
        """A TCP server on the test host answering one connection with `reply`."""
        port = 20000 + os.getpid() % 10000
        script = (
            "import socket,sys; s=socket.create_server(('0.0.0.0', int(sys.argv[1])));"
            " print('ready', flush=True); c,_=s.accept(); c.sendall(sys.argv[2].encode());"
            " c.close()"
        )
        server = self.run(sys.executable, "-c", script, str(port), reply.decode(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        assert server.stdout is not None and server.stdout.readline() == b"ready\n"
        return port, server


@pytest.fixture
def test_host() -> Iterator[NetnsHost]:
    tag = f"{os.getpid() % 100000}"
    name, veth = f"gwtest{tag}", f"gwt{tag}"
    host = NetnsHost(name, "198.18.0.2", "198.18.0.1")
    with veth_namespace(name, veth, host.gateway, host.address):
        yield host
