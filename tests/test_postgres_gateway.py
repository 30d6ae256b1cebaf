"""A whole gateway on PostgreSQL (`database_url`), driven with the real OpenSSH client."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.config import parse
from gateway.store import open_store
from gateway.store.schema import LATEST
from tests.conftest import Gateway, _gateway, wait_until
from tests.postgres import PostgresServer


def _on_postgres(root: Path, url: str) -> Gateway:
    gw = _gateway(root)
    gw.top_config = f'database_url = "{url}"\n'
    gw.write_config()
    return gw


def test_a_gateway_on_postgresql_serves_sessions(postgres: PostgresServer, tmp_path: Path) -> None:
    url = postgres.create_database()
    gw = _on_postgres(tmp_path / "gw", url)
    assert gw.cli("db:migrate").stdout == f"PostgreSQL {url}: schema v{LATEST} (migrated from v0)\n"
    gw.start()
    try:
        app = gw.new_app()
        hello = gw.ssh(app, "echo hello from $DYNO")
        assert (hello.returncode, hello.stdout) == (0, b"hello from run.1\n")
        assert gw.ssh(app, "run:detached", "sleep 30").returncode == 0
        listed = json.loads(gw.ssh(app, "run:list", "--json").stdout)
        assert [(d["name"], d["command"]) for d in listed] == [("run.2", "sleep 30")]
        check = gw.cli("check", check=False).stdout.splitlines()
        state = [line for line in check if "state: " in line]
        assert state == [f"ok   state: PostgreSQL {url} (schema v{LATEST}, 1 apps)"]
    finally:
        gw.stop()
    # Nothing of the state on this node's disk: no SQLite file, the slug in the database.
    assert not (gw.state_dir / "gateway.db").exists()
    assert not (gw.state_dir / "slugs").exists()
    store = open_store(parse({"database_url": url, "state_dir": str(gw.state_dir)}))
    store.write_slug(app, 1, tmp_path / "out.tgz")
    assert (tmp_path / "out.tgz").read_bytes() == (gw.root / f"{app}.tgz").read_bytes()


def test_while_postgresql_is_down_sessions_are_told_and_then_work_again(
    own_postgres: PostgresServer, tmp_path: Path
) -> None:
    server = own_postgres
    url = server.create_database()
    gw = _on_postgres(tmp_path / "gw", url)
    gw.start()
    try:
        app = gw.new_app()
        assert gw.ssh(app, "echo up").stdout == b"up\n"
        # A detached dyno printing through the outage, until told to finish.
        go = tmp_path / "go"
        loop = f"i=0; while [ ! -e {go} ]; do echo tick $i; i=$((i+1)); sleep 0.1; done; echo done"
        assert gw.ssh(app, "run:detached", loop).returncode == 0
        assert wait_until(lambda: "app[run.2]: tick 0" in gw.cli("logs", app).stdout, 10)
        server.stop()
        down = gw.ssh(app, "echo down")
        assert down.returncode == 255
        assert b"the gateway's database is unavailable; try again in a moment" in down.stderr
        admin = gw.cli("apps", check=False)
        assert admin.returncode == 1
        assert admin.stderr.startswith(
            f"gateway: the state database is unavailable (PostgreSQL {url}):"
        )
        check = gw.cli("check", check=False)
        assert check.returncode == 1
        assert f"FAIL state: {url}: the state database is unavailable" in check.stdout
        assert any("key check failed" in line and "unavailable" in line for line in gw.log)
        server.start()
        # The same gateway process, not restarted: within seconds of the server's return.
        assert wait_until(lambda: gw.ssh(app, "echo back").stdout == b"back\n", 10)
        assert gw.process is not None and gw.process.poll() is None
        # The dyno lived through it; what it printed meanwhile waited and was written
        # once the server was back: every tick, in order; its end is recorded as any other.
        assert any("app log waiting for the database" in line for line in gw.log)
        go.touch()
        assert wait_until(lambda: gw.ssh(app, "run:list", "--json").stdout == b"[]\n", 10)
        log = gw.cli("logs", app, "-n", "1500").stdout
        ticks = [int(line.rsplit(" ", 1)[1]) for line in log.splitlines() if "]: tick " in line]
        assert ticks == list(range(len(ticks))) and len(ticks) > 1
        assert "app[run.2]: done" in log
        assert "heroku[run.2]: Process exited with status 0" in log
    finally:
        gw.stop()
