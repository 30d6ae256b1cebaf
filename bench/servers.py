"""The two servers under test, each on a loopback port and accepting the same client key:
OpenSSH's sshd with a throwaway config, and the gateway (`gateway serve`) with the sample
app released.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncssh

from bench import proc

REPO = Path(__file__).resolve().parent.parent
SAMPLE_APP = REPO / "contrib" / "sample-app"
SSHD = "/usr/sbin/sshd"
APP = "bench"

# The OpenSSH client options both servers get (`-F /dev/null`: no user config). The key
# exchange is pinned to one both speak: by default OpenSSH 9.x picks sntrup761x25519 with
# sshd (about 0.1 s of client CPU here) and curve25519 with asyncssh, which would time the
# client's choice rather than the servers.
KEX = "curve25519-sha256"
SSH_OPTIONS = [
    "-F", "/dev/null",
    "-o", f"KexAlgorithms={KEX}",
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "BatchMode=yes",
    "-o", "IdentitiesOnly=yes",
    "-o", "LogLevel=ERROR",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def client_key(directory: Path) -> Path:
    """An ed25519 client key pair in `directory`, made once."""
    key = directory / "client_ed25519"
    if not key.exists():
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f", str(key)],
            check=True,
        )
    return key


def _raise_limits() -> None:
    """In the child before exec: as many open files as the bench has."""
    proc.raise_fd_limit()


class Server:
    """What the measurements need of either server."""

    name = ""

    def __init__(self, root: Path, key: Path, user: str) -> None:
        self.root = root
        self.key = key
        self.user = user
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def ssh_argv(
        self,
        command: str,
        cipher: str | None = None,
        user: str | None = None,
        options: tuple[str, ...] = (),
    ) -> list[str]:
        """The OpenSSH client running `command`, with the same options for both servers."""
        argv = ["ssh", *SSH_OPTIONS, "-i", str(self.key), "-p", str(self.port), *options]
        if cipher:
            argv += ["-c", cipher]
        return [*argv, f"{user or self.user}@127.0.0.1", command]

    @contextlib.contextmanager
    def control_master(self) -> Iterator[tuple[str, ...]]:
        """An OpenSSH ControlMaster connection to this server; yields the client options
        that run a command as a new session on it (what CI runners and Ansible do)."""
        options = ("-S", str(self.root / "control.sock"))
        master = subprocess.Popen(
            self.ssh_argv("", options=(*options, "-M", "-N")),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            check = self.ssh_argv("", options=(*options, "-O", "check"))
            while subprocess.run(check, capture_output=True).returncode != 0:
                if master.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name}: no control master: {master.stderr}")
                time.sleep(0.05)
            yield options
        finally:
            subprocess.run(self.ssh_argv("", options=(*options, "-O", "exit")), capture_output=True)
            try:
                master.wait(10)
            except subprocess.TimeoutExpired:
                master.kill()
                master.wait()

    async def connect(
        self, user: str | None = None, **options: Any
    ) -> asyncssh.SSHClientConnection:
        """An asyncssh client connection with the bench's key and no local config."""
        return await asyncssh.connect(
            "127.0.0.1",
            self.port,
            username=user or self.user,
            client_keys=[str(self.key)],
            known_hosts=None,
            agent_path=None,
            config=None,
            kex_algs=[KEX],
            server_host_key_algs=["ssh-ed25519"],
            **options,
        )

    def memory(self) -> dict[str, proc.Memory]:
        """The server's own processes' memory (not the sessions' commands), by part."""
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def _spawn(
        self, argv: list[str], ready: str, env: dict[str, str] | None = None, timeout: float = 60
    ) -> None:
        """Start `argv` with a raised fd limit, its stderr to `log_path`; wait until `ready`
        shows there. A file rather than a pipe: a reader thread here would compete for
        the GIL with the clients being timed."""
        start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                preexec_fn=_raise_limits,
                cwd=self.root,
            )
        deadline = time.monotonic() + timeout
        while ready not in self._log_text(start):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(self.log[-20:])
                self.stop()
                raise RuntimeError(f"{self.name} did not start:\n{tail}")
            time.sleep(0.05)

    @property
    def log_path(self) -> Path:
        return self.root / f"{self.name}.log"

    @property
    def log(self) -> list[str]:
        """The server's log so far, a line each."""
        return self._log_text().splitlines()

    def _log_text(self, start: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(start)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Sshd(Server):
    """OpenSSH's sshd, lean: no PAM, no motd, no lastlog, no DNS; the current user logs in
    with its own shell."""

    name = "sshd"

    def __init__(self, root: Path, key: Path) -> None:
        super().__init__(root, key, getpass.getuser())

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        host_key = self.root / "ssh_host_ed25519_key"
        if not host_key.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True
            )
        authorized = self.root / "authorized_keys"
        shutil.copy(self.key.with_name(self.key.name + ".pub"), authorized)
        config = self.root / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
            f"PidFile {self.root / 'sshd.pid'}\nAuthorizedKeysFile {authorized}\n"
            "StrictModes no\nUsePAM no\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
            "PermitRootLogin prohibit-password\nUseDNS no\nPrintMotd no\nPrintLastLog no\n"
            "MaxStartups 2000\nMaxSessions 100\nLogLevel ERROR\nSetEnv SHLVL=1\n"
        )
        if os.geteuid() == 0:
            # sshd's privilege separation directory (the Debian service makes it at start).
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        # -D: stay in the foreground; -e: log to stderr. sshd prints nothing once ready,
        # so readiness is the port accepting.
        self.process = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "sshd.log", "ab"),  # noqa: SIM115 - the child owns it
            preexec_fn=_raise_limits,
        )
        _wait_for_port(self.port, self.process)
        # The port was free when picked; make sure it is our sshd that answers on it.
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            banner = sock.recv(256)
        if not banner.startswith(b"SSH-2.0-OpenSSH") or self.process.poll() is not None:
            self.stop()
            raise RuntimeError(f"port {self.port} answered {banner!r}, not our sshd")

    def memory(self) -> dict[str, proc.Memory]:
        """The listener and every per-connection sshd (monitor and session processes)."""
        if self.process is None:
            return {}
        pids = [self.process.pid] + [
            pid for pid in proc.descendants(self.process.pid) if proc.comm(pid) == "sshd"
        ]
        return {"sshd": proc.total(pids)}


class Gateway(Server):
    """`gateway serve` with the sample app released as `bench`: the default sandbox as
    root (namespaces), or the process sandbox (`sandbox="process"`, named
    "gateway-process")."""

    # One log line: "2024-01-01 12:00:00,123 gateway.manager INFO dyno up app=A dyno=run.1 ..."
    _LINE = re.compile(r"^(\S+ \S+) \S+ \S+ dyno (starting|up) app=(\S+) dyno=(\S+)")

    def __init__(
        self, root: Path, key: Path, tree: Path | None = None, sandbox: str = "namespaces"
    ) -> None:
        self.name = "gateway" if sandbox == "namespaces" else f"gateway-{sandbox}"
        super().__init__(root, key, APP)
        self.sandbox = sandbox
        self.config_path = root / "gateway.toml"
        # Another checkout's `gateway` package to run instead (before/after comparisons).
        self.env = dict(os.environ, PYTHONPATH=str(tree)) if tree else None

    def settings(self) -> dict[str, dict[str, object]]:
        """The config, table by table ("" holds the top-level keys)."""
        return {
            "": {"state_dir": "state", "keys_dir": "keys"},
            # As the throwaway sshd (MaxStartups 2000, no per-source limits): room for the
            # dynos section's connections, all from one address.
            "ssh": {
                "listen": f"127.0.0.1:{self.port}",
                "max_startups": "2000:30:2000",
                "per_source_max_startups": 0,
                "per_netblock_max_startups": 0,
                "per_netblock_max_pending": 0,
                "max_sessions": 100,
            },
            # Only SSH is measured: no other listeners (nor their fixed ports).
            "rendezvous": {"listen": ""},
            "api": {"listen": ""},
            "metrics": {"listen": ""},
            # Room for the dynos section's 1000 on one app and one host (defaults: 50, 200).
            "dynos": {"sandbox": self.sandbox, "max_per_app": 100000, "max_per_host": 100000},
        }

    def setup(self) -> None:
        """Write the config and create the sample app with the bench's key. Settings an
        older gateway does not know (--gateway-tree) are left out."""
        from gateway.cli.serving import pack_dir

        self.root.mkdir(parents=True, exist_ok=True)
        settings = self.settings()
        while True:
            self.config_path.write_text(_toml(settings))
            result = self._run_cli("apps:create", APP)
            unknown = re.search(r"unknown key '([\w.]+)'", result.stderr)
            if result.returncode == 0 or not unknown:
                break
            table, _, key = unknown[1].rpartition(".")  # "ssh.max_startups" or "metrics"
            if table in settings and key in settings[table]:
                del settings[table][key]
            elif not table and key in settings:
                del settings[key]
            else:
                break  # not one of ours: report it
        if result.returncode != 0:
            raise RuntimeError(f"gateway apps:create failed: {result.stderr}")
        slug = self.root / "sample-app.tgz"
        pack_dir(SAMPLE_APP, slug)
        self.add_app(APP, slug, create=False)

    def _run_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", "--config", str(self.config_path), *args],
            capture_output=True,
            text=True,
            env=self.env,
        )

    def cli(self, *args: str) -> str:
        result = self._run_cli(*args)
        if result.returncode != 0:
            raise RuntimeError(f"gateway {' '.join(args)} failed: {result.stderr}")
        return result.stdout

    def add_app(self, name: str, slug: Path, create: bool = True) -> None:
        if create:
            self.cli("apps:create", name)
        self.cli("keys:add", name, str(self.key) + ".pub")
        self.cli("releases:create", name, str(slug))

    def start(self) -> None:
        if not self.config_path.exists():
            self.setup()
        argv = [sys.executable, "-m", "gateway", "--config", str(self.config_path), "serve"]
        self._spawn(argv, "SSH listening on", self.env)

    def pids(self) -> dict[str, int]:
        """The manager (`serve`) and the front (its child running `_front`)."""
        assert self.process is not None
        manager = self.process.pid
        pids = {"manager": manager}
        for pid in proc.descendants(manager):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                if b"_front" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                    pids["front"] = pid
        return pids

    def memory(self) -> dict[str, proc.Memory]:
        if self.process is None:
            return {}
        return {part: proc.memory(pid) for part, pid in self.pids().items()}

    def sandbox_times(self, app: str) -> list[float]:
        """Seconds from `dyno starting` to `dyno up` in the manager's log, per dyno of
        `app`, in order: the sandbox's share of a start."""
        starts: dict[str, datetime] = {}
        times = []
        for line in list(self.log):
            match = self._LINE.match(line)
            if not match or match[3] != app:
                continue
            when = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f")
            if match[2] == "starting":
                starts[match[4]] = when
            elif match[4] in starts:
                times.append((when - starts.pop(match[4])).total_seconds())
        return times


def _toml(tables: dict[str, dict[str, object]]) -> str:
    """The few TOML forms the config needs: strings and integers in tables."""
    lines = []
    for table, values in tables.items():
        if table:
            lines.append(f"[{table}]")
        for key, value in values.items():
            lines.append(f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {value}")
    return "\n".join(lines) + "\n"


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited at start with status {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")
