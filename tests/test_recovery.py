"""After kill -9 of the gateway while dynos run, the next start cleans up honestly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from tests.conftest import Gateway, pids_with, wait_until


def test_kill_9_then_restart_leaves_nothing_and_closes_the_records(own_gateway: Gateway) -> None:
    gw = own_gateway
    gw.start()
    app = gw.new_app()
    attached_marker = f"sleep 1000.{os.getpid()}1"
    detached_marker = f"sleep 1000.{os.getpid()}2"
    client = subprocess.Popen(
        gw.ssh_argv(app, f"{attached_marker}; true"), stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert gw.ssh(app, "run:detached", f"{detached_marker}; true").returncode == 0
    try:
        assert wait_until(
            lambda: pids_with(attached_marker, client) and pids_with(detached_marker), 10
        )
        assert gw.process is not None
        serve = gw.process.pid
        front = [
            int(c)
            for t in Path(f"/proc/{serve}/task").iterdir()
            for c in (t / "children").read_text().split()
        ]
        for pid in [serve, *front]:
            os.kill(pid, signal.SIGKILL)
        gw.process.wait()
        gw.process = None
        # The sleeps are grandchildren: the manager's death alone does not end them.
        assert pids_with(detached_marker), "expected an orphan for the next start to find"
        gw.start()
        assert wait_until(
            lambda: not pids_with(attached_marker, client) and not pids_with(detached_marker), 5
        )
    finally:
        client.kill()
        client.wait()
    assert not any((gw.state_dir / "dynos").iterdir())
    logs = gw.cli("logs", app).stdout
    assert "heroku[run.1]: State changed from up to crashed" in logs
    assert "heroku[run.2]: State changed from up to crashed" in logs
    assert json.loads(gw.ssh(app, "run:list", "--json").stdout) == []
    usage = json.loads(gw.cli("usage", app, "--json").stdout)
    assert usage[0]["dynos"] == 2
    assert gw.ssh(app, "echo $DYNO").stdout == b"run.3\n"
