"""SIGTERM: stop accepting, tell attached clients, drain, then end what is left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from tests.conftest import Gateway, pids_with, wait_until


def test_sigterm_tells_attached_clients_and_leaves_nothing(own_gateway: Gateway) -> None:
    gw = own_gateway
    gw.extra_config = "stop_grace = 2\n[shutdown]\ndrain_timeout = 1\n"
    gw.write_config()
    gw.start()
    app = gw.new_app()
    attached = f"sleep 1000.{os.getpid()}3"
    detached = f"sleep 1000.{os.getpid()}4"
    client = subprocess.Popen(
        gw.ssh_argv(app, f"{attached}; true"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert wait_until(lambda: pids_with(attached, client), 10)  # so it is run.1
    assert gw.ssh(app, "run:detached", f"{detached}; true").returncode == 0
    assert wait_until(lambda: pids_with(detached), 10)
    assert gw.process is not None
    started = time.monotonic()
    gw.process.send_signal(signal.SIGTERM)
    _, err = client.communicate(timeout=15)
    assert b"gateway: shutting down; this session will be closed in 1 s" in err
    assert gw.process.wait(20) == 0
    assert time.monotonic() - started < 10
    gw.process = None
    assert not pids_with(attached) and not pids_with(detached)
    assert not any((gw.state_dir / "dynos").iterdir())
    logs = gw.cli("logs", app).stdout
    assert "heroku[run.1]: Process exited with status 129" in logs  # hung up, as on disconnect
    assert "heroku[run.2]: Stopping all processes with SIGTERM" in logs
    assert "heroku[run.2]: State changed from up to complete" in logs
    refused = subprocess.run(gw.ssh_argv(app, "true"), capture_output=True, timeout=30)
    assert refused.returncode == 255  # nothing listens any more


def test_a_second_interrupt_stops_now_in_one_line(own_gateway: Gateway) -> None:
    """Ctrl-C twice: the first starts the drain (10 s by default), the second stops now,
    says so in one line (no traceback) and leaves no dyno behind."""
    gw = own_gateway
    gw.start()
    app = gw.new_app()
    attached = f"sleep 1000.{os.getpid()}5"
    detached = f"sleep 1000.{os.getpid()}6"
    client = subprocess.Popen(
        gw.ssh_argv(app, f"{attached}; true"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert wait_until(lambda: pids_with(attached, client), 10)
    # A detached dyno that ignores SIGTERM: stopped gracefully it would take stop_grace.
    assert gw.ssh(app, "run:detached", f"trap '' TERM; {detached}; true").returncode == 0
    assert wait_until(lambda: pids_with(detached), 10)
    assert gw.process is not None
    gw.process.send_signal(signal.SIGINT)
    assert wait_until(lambda: any("stopping on SIGINT" in line for line in gw.log), 10)
    started = time.monotonic()
    gw.process.send_signal(signal.SIGINT)
    assert gw.process.wait(20) == 128 + signal.SIGINT
    assert time.monotonic() - started < 5
    client.communicate(timeout=15)
    assert gw.log_ended.wait(10)
    said = [line for line in gw.log if line.startswith("gateway: ")]
    assert said[-1] == "gateway: second interrupt, stopping now"
    log = "\n".join(gw.log)
    assert "Traceback" not in log and "ExceptionGroup" not in log and "KeyboardInterrupt" not in log
    assert wait_until(lambda: not pids_with(attached) and not pids_with(detached), 5)
    assert not any((gw.state_dir / "dynos").iterdir())
    dynos = {d["name"]: d for d in json.loads(gw.cli("ps", app, "--json").stdout)}
    assert dynos == {}  # no record left claiming to run
