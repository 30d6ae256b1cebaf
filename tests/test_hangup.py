"""Hang-ups as sshd has them, in both sandboxes: a client that goes away takes its dyno with
it (an interactive shell's jobs included), and what was started to survive a hang-up
(`nohup`, a trap) runs on, detached, until it ends or is stopped.

"Every process of the dyno" is found the way an operator would: by an environment
variable only that app's dynos carry (a config var), in /proc/*/environ.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Gateway, _gateway, pids_with, wait_until
from tests.test_heroku_cli import _heroku, heroku_bin  # noqa: F401 (a fixture)
from tests.test_interactive import Terminal


def _with_sandbox(gw: Gateway, sandbox: str) -> Gateway:
    text = gw.config_path.read_text()
    gw.config_path.write_text(text.replace('sandbox = "process"', f'sandbox = "{sandbox}"'))
    return gw


@pytest.fixture(scope="module", params=["process", "namespaces"])
def gw(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    gateway = _with_sandbox(_gateway(tmp_path_factory.mktemp(request.param)), request.param)
    gateway.start()
    assert any(f"sandbox in force: {request.param}" in line for line in gateway.log)
    yield gateway
    gateway.stop()


def tagged_app(gw: Gateway) -> tuple[str, str]:
    """A new app whose dynos carry a config var no other process has."""
    app = gw.new_app()
    tag = f"hangup-{secrets.token_hex(6)}"
    gw.cli("config:set", app, f"DYNO_TAG={tag}")
    return app, tag


def dyno_processes(tag: str) -> dict[int, str]:
    """pid -> command name of every process of the dyno's own (its init, a helper, only
    where it was started with the dyno's environment)."""
    found = {}
    needle = f"DYNO_TAG={tag}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found[int(entry.name)] = (entry / "comm").read_text().strip()
        except OSError:
            continue  # ended meanwhile
    return found


def ssh_shell(gw: Gateway, app: str, *command: str) -> subprocess.Popen[bytes]:
    """OpenSSH's client with a terminal (-tt), its input a pipe the test types into."""
    return subprocess.Popen(
        gw.ssh_argv(app, *command, tty=True),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def type_line(client: subprocess.Popen[bytes], line: str) -> None:
    assert client.stdin is not None
    client.stdin.write(line.encode() + b"\n")
    client.stdin.flush()


def logged(gw: Gateway, app: str, dyno: str = "run.1") -> list[str]:
    return [
        line.split(": ", 1)[1]
        for line in gw.cli("logs", app, "-p", dyno).stdout.splitlines()
        if f"heroku[{dyno}]" in line
    ]


def running_dynos(gw: Gateway, app: str) -> str:
    return gw.cli("ps", app).stdout


def test_an_interactive_shell_and_its_jobs_end_with_the_client(gw: Gateway) -> None:
    app, tag = tagged_app(gw)
    client = ssh_shell(gw, app)  # no command: the shell, with job control
    type_line(client, "sleep 500 &")  # a job in a process group of its own
    type_line(client, "sleep 600")  # and one in the terminal's foreground
    assert wait_until(lambda: list(dyno_processes(tag).values()).count("sleep") == 2, 15)
    client.kill()
    client.wait()
    assert wait_until(lambda: not dyno_processes(tag), 2), dyno_processes(tag)
    assert wait_until(lambda: "State changed from up to complete" in logged(gw, app), 5)
    assert "run.1" not in running_dynos(gw, app)


def test_a_nohup_job_survives_the_hang_up_and_the_dyno_runs_on(gw: Gateway) -> None:
    app, tag = tagged_app(gw)
    client = ssh_shell(gw, app)
    type_line(client, "nohup sleep 300 &")
    type_line(client, "sleep 600")
    assert wait_until(lambda: list(dyno_processes(tag).values()).count("sleep") == 2, 15)
    client.kill()
    client.wait()

    def survivors() -> list[str]:
        return sorted(name for name in dyno_processes(tag).values() if name != "dyno-init")

    # The shell and its foreground job hang up; the nohup job stays.
    assert wait_until(lambda: survivors() == ["sleep"], 2), survivors()
    time.sleep(1)
    assert survivors() == ["sleep"]
    assert "run.1 " in running_dynos(gw, app)  # up, detached: still the app's dyno
    assert "State changed from up to complete" not in logged(gw, app)
    # ... until it is stopped, as any dyno.
    gw.cli("ps:stop", app, "run.1")
    assert wait_until(lambda: not dyno_processes(tag), 5), survivors()
    assert wait_until(lambda: "State changed from up to complete" in logged(gw, app), 5)
    assert "Stopping all processes with SIGTERM" in logged(gw, app)


def test_without_a_terminal_the_hang_up_reaches_the_group_and_spares_nohup(gw: Gateway) -> None:
    app, tag = tagged_app(gw)
    client = subprocess.Popen(
        gw.ssh_argv(app, "nohup sleep 300 >/dev/null 2>&1 & sleep 600"),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert wait_until(lambda: list(dyno_processes(tag).values()).count("sleep") == 2, 15)
    client.kill()
    client.wait()
    own = lambda: sorted(n for n in dyno_processes(tag).values() if n != "dyno-init")  # noqa: E731
    assert wait_until(lambda: own() == ["sleep"], 2), own()
    assert "run.1 " in running_dynos(gw, app)
    gw.cli("ps:stop", app, "run.1")
    assert wait_until(lambda: not dyno_processes(tag), 5)


def test_a_client_gone_while_its_dyno_starts_still_hangs_it_up(gw: Gateway) -> None:
    """The hang-up may come just after the manager handed the dyno's streams over, before
    the command has exec'd (bwrap takes milliseconds to build the sandbox): it must not be
    lost there, nor while the sandbox is still being prepared."""
    for attempt in range(10):
        app, tag = tagged_app(gw)
        client = subprocess.Popen(
            gw.ssh_argv(app, f"sleep 1000.{attempt}"),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        step = "dyno up" if attempt % 2 else "dyno starting"
        seen = f"{step} app={app} "
        assert wait_until(lambda seen=seen: any(seen in line for line in gw.log), 15)
        client.kill()
        client.wait()
        assert wait_until(lambda tag=tag: not dyno_processes(tag), 5), (
            f"attempt {attempt}: the dyno outlived a client that left at {step!r}"
        )


def test_heroku_run_bash_ends_with_the_cli(gw: Gateway, heroku_bin: Path, tmp_path: Path) -> None:  # noqa: F811
    heroku = _heroku(gw, heroku_bin)
    tag = f"hangup-{secrets.token_hex(6)}"
    gw.cli("config:set", heroku.app, f"DYNO_TAG={tag}")
    env = " ".join(
        f"{k}='{v}'"
        for k, v in heroku.env.items()
        if k.startswith(("HEROKU", "NODE", "DISABLE", "PATH", "HOME"))
    )
    marker = f"run -a {heroku.app} -- bash"
    term = Terminal(tmp_path, ["sh", "-c", f"env {env} {heroku.binary} {marker}"])
    try:
        term.wait_for(r"up, run\.\d+", timeout=30)
        term.line("sleep 500 &")
        term.line("sleep 600")
        assert wait_until(lambda: list(dyno_processes(tag).values()).count("sleep") == 2, 15)
        cli = pids_with(marker)
        assert cli, "the heroku CLI process was not found"
        for pid in cli:
            os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: not dyno_processes(tag), 2), dyno_processes(tag)
        assert wait_until(lambda: "State changed from up to complete" in logged(gw, heroku.app), 5)
    finally:
        term.close()
