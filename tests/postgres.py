"""A throwaway PostgreSQL server for tests: initdb and pg_ctl in a temp dir, listening on a
loopback port only. As root it runs as `nobody` (PostgreSQL refuses to run as root)."""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg
import pytest

USER = "gateway"  # the superuser initdb makes; trust authentication on loopback
_databases = itertools.count(1)


def _bindir() -> Path | None:
    """Debian keeps initdb and pg_ctl in /usr/lib/postgresql/VERSION/bin, off PATH."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """One cluster: made by `create`, removed by `destroy`."""

    def __init__(self, root: Path, bindir: Path, settings: str = "") -> None:
        self.root = root
        self.settings = settings  # more `-c NAME=VALUE` server options
        self.bindir = bindir
        self.port = _free_port()
        self.data = root / "data"
        self._run_as: dict[str, object] = {}
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            self._run_as = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
            os.chown(root, nobody.pw_uid, nobody.pw_gid)

    @classmethod
    def create(cls, settings: str = "") -> PostgresServer:
        """A new cluster, started; skips the test when PostgreSQL is not installed."""
        bindir = _bindir()
        if bindir is None:
            pytest.skip(
                "PostgreSQL is not installed (apt-get install postgresql; ./dev test does it)"
            )
        # Not under pytest's tmp dirs: they are 0700 root's, and the server may be nobody.
        server = cls(Path(tempfile.mkdtemp(prefix="gateway-pg-")), bindir, settings)
        server._pg(
            "initdb", "-D", str(server.data), "-U", USER, "--auth=trust", "--no-sync",
            "--encoding=UTF8", "--locale=C.UTF-8",
        )  # fmt: skip
        server.start()
        return server

    def _pg(self, tool: str, *args: str) -> None:
        result = subprocess.run(
            [str(self.bindir / tool), *args],
            capture_output=True,
            text=True,
            cwd=self.root,
            env={"PATH": os.environ.get("PATH", ""), "HOME": str(self.root), "LC_ALL": "C.UTF-8"},
            timeout=120,
            **self._run_as,  # type: ignore[arg-type]
        )
        if result.returncode != 0:
            log = self.root / "server.log"
            raise AssertionError(
                f"{tool} failed: {result.stdout}{result.stderr}"
                + (log.read_text() if log.exists() else "")
            )

    def start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off " + self.settings
        )
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"),
                 "-o", options, "-w", "start")  # fmt: skip

    def stop(self) -> None:
        """A fast shutdown: sessions are ended, transactions rolled back."""
        self._pg("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its URL."""
        name = f"gw{next(_databases)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)
