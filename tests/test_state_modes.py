"""The state is private whatever the umask (issue 12, item 2): state_dir, keys_dir, the
database and everything under them are 0700/0600, another local user cannot read an
app's config vars, and `gateway check` fails on a database others can read."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import Gateway, wait_until

NOBODY = 65534
# A Python every user can run (the venv's may live under /root, 0700).
SYSTEM_PYTHON = Path("/usr/bin/python3")
# The dyno init is the one file others may execute: a bwrap dyno's user runs it.
EXECUTE_ONLY = "dyno-init-"


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes_under(*roots: Path) -> dict[str, int]:
    found = {}
    for root in roots:
        for top, dirs, files in os.walk(root):
            for name in [".", *dirs, *files]:
                path = Path(top) / name
                found[str(path)] = stat.S_IMODE(os.lstat(path).st_mode)
    return found


def test_everything_the_gateway_makes_is_private_under_umask_000(
    reachable_gateway: Gateway,
) -> None:
    gw = reachable_gateway
    with umask(0):
        # What an older version left: a state dir anyone could enter.
        gw.state_dir.mkdir(mode=0o755)
        app = gw.new_app({"Procfile": "worker: echo working\n"})
        gw.cli("config:set", app, "SECRET=hunter2")
        gw.start()
        assert gw.ssh(app, "echo hi > made-by-dyno; echo out").stdout == b"out\n"
        detached = gw.ssh(app, "run:detached", "echo from-detached")
        assert detached.returncode == 0
        assert wait_until(lambda: "from-detached" in gw.cli("logs", app).stdout, 20)
        gw.cli("tokens:create", "--app", app)
    modes = modes_under(gw.state_dir, gw.root / "keys")
    assert str(gw.state_dir / "gateway.db") in modes
    assert str(gw.state_dir / "gateway.db-wal") in modes
    assert any("/releases/" in path for path in modes)
    loose = {
        path: f"{mode:04o}"
        for path, mode in modes.items()
        if mode & 0o077 and not (EXECUTE_ONLY in path and mode == 0o711)
    }
    assert loose == {}
    assert stat.S_IMODE(gw.state_dir.stat().st_mode) == 0o700
    assert any(f"mode of {gw.state_dir} was 0755, now 0700" in line for line in gw.log)


def _read_as(uid: int, db: Path) -> subprocess.CompletedProcess[str]:
    """Read every config var straight from the database file, as the issue's reporter did."""
    code = (
        "import sqlite3, sys; "
        "db = sqlite3.connect(f'file:{sys.argv[1]}?mode=ro', uri=True); "
        "print(db.execute('SELECT value FROM config_vars').fetchall())"
    )
    return subprocess.run(
        [str(SYSTEM_PYTHON), "-c", code, str(db)],
        user=uid,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason="needs /usr/bin/python3 (Debian python3)")
@pytest.mark.skipif(os.geteuid() != 0, reason="reading as another uid needs root")
def test_another_local_user_cannot_read_the_database(reachable_gateway: Gateway) -> None:
    gw = reachable_gateway
    app = gw.new_app()
    gw.cli("config:set", app, "SECRET=hunter2")
    db = gw.state_dir / "gateway.db"
    # The control: the same read as the gateway's user finds the secret, and uid 65534
    # can reach the directory the state dir is in.
    assert "hunter2" in _read_as(0, db).stdout
    assert subprocess.run(["ls", str(gw.root)], user=NOBODY, capture_output=True).returncode == 0
    nobody = _read_as(NOBODY, db)
    assert nobody.returncode != 0
    assert "hunter2" not in nobody.stdout
    assert "unable to open database file" in nobody.stderr


def test_check_fails_on_a_database_others_can_read(reachable_gateway: Gateway) -> None:
    gw = reachable_gateway
    gw.new_app()
    assert gw.cli("check").returncode == 0
    db = gw.state_dir / "gateway.db"
    db.chmod(0o644)
    result = gw.cli("check", check=False)
    assert result.returncode == 1
    assert f"FAIL modes: {db}: mode 0644 lets other users in (chmod go-rwx {db})" in result.stdout
    db.chmod(0o600)
    gw.state_dir.chmod(0o711)  # enterable by name is still too much
    result = gw.cli("check", check=False)
    assert result.returncode == 1
    assert f"FAIL modes: {gw.state_dir}: mode 0711" in result.stdout
