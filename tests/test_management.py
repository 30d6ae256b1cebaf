"""Dyno management over SSH (run:detached, run:list, run:stop, run:logs), limits, usage."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time

import pytest

from tests.conftest import Gateway, wait_until


def logs(gateway: Gateway, app: str, *args: str) -> str:
    result = gateway.ssh(app, "run:logs", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.decode()


def test_run_detached_returns_at_once_and_logs_its_output(gateway: Gateway) -> None:
    app = gateway.new_app()
    started = time.monotonic()
    result = gateway.ssh(app, "run:detached", "echo hello; sleep 1; echo bye")
    assert time.monotonic() - started < 1.5
    assert result.returncode == 0, result.stderr
    name = re.search(rb"up, (run\.\d+)", result.stdout).group(1).decode()  # type: ignore[union-attr]
    assert name == "run.1"
    assert f"run:logs -p {name}".encode() in result.stdout

    def ended() -> bool:
        return f"heroku[{name}]: State changed from up to complete" in logs(
            gateway, app, "-p", name
        )

    assert wait_until(ended, 3 + 1)
    lines = logs(gateway, app, "-p", name).splitlines()
    texts = [line.split(" ", 1)[1] for line in lines]
    assert texts == [
        "heroku[run.1]: Starting process with command `echo hello; sleep 1; echo bye`",
        "heroku[run.1]: State changed from starting to up",
        "app[run.1]: hello",
        "app[run.1]: bye",
        "heroku[run.1]: Process exited with status 0",
        "heroku[run.1]: State changed from up to complete",
    ]
    assert "run.1" not in gateway.ssh(app, "run:list").stdout.decode()


def test_run_detached_prints_a_run_logs_line_that_works(gateway: Gateway) -> None:
    """One quoted word after the options, as a heroku command is written, is the
    command's text; the printed follow-up names the real host and port."""
    app = gateway.new_app()
    result = gateway.ssh(app, "run:detached 'echo a; echo b'")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "Running `echo a; echo b` detached... up, run.1 (Standard-1X)"
    follow = f"ssh -p {gateway.port} {app}@127.0.0.1 run:logs -p run.1 --tail"
    assert lines[1] == f"Use `{follow}` to view the output."
    # As the user would run it (with the test's key and no known_hosts prompt).
    argv = shlex.split(follow)
    options = gateway.ssh_argv(app)[1:-1]  # the test's own ssh options, without -p/dest
    tail = subprocess.Popen(
        [argv[0], *options, *argv[1:]], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
    )
    seen = []
    try:
        assert tail.stdout is not None
        for raw in tail.stdout:
            seen.append(raw.decode().split(" ", 1)[1].rstrip())
            if "app[run.1]: b" in seen[-1]:
                break
    finally:
        tail.kill()
        tail.wait()
    assert "app[run.1]: a" in seen and "app[run.1]: b" in seen


def test_run_with_one_quoted_word_runs_its_text_but_a_plain_command_is_left_alone(
    gateway: Gateway,
) -> None:
    app = gateway.new_app()
    assert gateway.ssh(app, "run 'echo a; echo b'").stdout == b"a\nb\n"
    assert gateway.ssh(app, 'run -e X=1 -- "echo \\"$X  2\\""').stdout == b"1  2\n"
    # A plain command is the user's own shell text, exactly as OpenSSH's sshd runs it.
    plain = gateway.ssh(app, "'echo a; echo b'")
    assert plain.returncode == 127 and b"command not found" in plain.stderr


def test_run_detached_names_the_public_host_and_port(own_gateway: Gateway) -> None:
    gw = own_gateway
    gw.ssh_config = 'public_host = "gw.example.test"\npublic_port = 22\n'
    gw.write_config()
    gw.start()
    app = gw.new_app()
    result = gw.ssh(app, "run:detached", "true")
    assert result.returncode == 0, result.stderr
    assert f"Use `ssh {app}@gw.example.test run:logs -p run.1 --tail`".encode() in result.stdout


def test_run_with_options_sets_size_and_env(gateway: Gateway) -> None:
    app = gateway.new_app()
    result = gateway.ssh(
        app, "run", "--size", "standard-2x", "-e", "GREETING=hi", "--", "echo $GREETING"
    )
    assert result.stdout == b"hi\n" and result.returncode == 0
    bad = gateway.ssh(app, "run", "--size", "huge", "true")
    assert bad.returncode == 1
    assert b"unknown dyno size 'huge': choose one of standard-1x" in bad.stderr
    # The refusal made no dyno: the next one is run.2, and run.1 ran as standard-2x.
    assert gateway.ssh(app, "echo $DYNO").stdout == b"run.2\n"
    sizes = {row["size"] for row in json.loads(gateway.cli("usage", app, "--json").stdout)}
    assert sizes == {"standard-1x", "standard-2x"}


def test_run_list_shows_another_connections_dyno(gateway: Gateway) -> None:
    app = gateway.new_app()
    attached = subprocess.Popen(
        gateway.ssh_argv(app, "echo up; sleep 30"), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert attached.stdout is not None and attached.stdout.readline() == b"up\n"
        listing = gateway.ssh(app, "run:list").stdout.decode()
        assert listing.splitlines()[0] == "=== run: one-off processes (1)"
        assert re.fullmatch(
            r"run\.1 \(Standard-1X\): up \d{4}/\d\d/\d\d \d\d:\d\d:\d\d \+0000 \(~ \d+s ago\): "
            r"echo up; sleep 30",
            listing.splitlines()[1],
        ), listing
        rows = json.loads(gateway.ssh(app, "run:list", "--json").stdout)
        assert [(r["name"], r["size"], r["command"], r["state"], r["type"]) for r in rows] == [
            ("run.1", "standard-1x", "echo up; sleep 30", "up", "run")
        ]
        assert json.loads(gateway.cli("ps", app, "--json").stdout) == rows
    finally:
        attached.kill()
        attached.wait()


def test_run_stop_ends_a_dyno_that_traps_term(own_gateway: Gateway) -> None:
    own_gateway.extra_config = "stop_grace = 1\n"
    own_gateway.write_config()
    own_gateway.start()
    gw = own_gateway
    app = gw.new_app()
    gw.ssh(app, "run:detached", "trap 'echo got TERM' TERM; while :; do sleep 0.2; done")
    assert wait_until(lambda: "State changed from starting to up" in logs(gw, app), 5)
    stopped = gw.ssh(app, "run:stop", "run.1")
    assert stopped.returncode == 0
    assert stopped.stdout == f"Stopping run.1 dyno on {app}... done\n".encode()
    assert wait_until(lambda: "Process exited with status 137" in logs(gw, app), 20)
    text = logs(gw, app)
    assert "heroku[run.1]: Stopping all processes with SIGTERM" in text
    assert "app[run.1]: got TERM" in text
    assert "Error R12 (Exit timeout)" in text
    missing = gw.ssh(app, "run:stop", "run.999")
    assert missing.returncode == 1
    assert missing.stderr == f"gateway: no running dyno run.999 on {app}; see run:list\n".encode()
    assert gw.ssh(app, "run:stop", "web").returncode == 1


def test_per_app_limit_refuses_the_next_run_and_spares_other_apps(own_gateway: Gateway) -> None:
    own_gateway.extra_config = "max_per_app = 3\n"
    own_gateway.write_config()
    own_gateway.start()
    gw = own_gateway
    app, other = gw.new_app(), gw.new_app()
    for _ in range(3):
        assert gw.ssh(app, "run:detached", "sleep 30").returncode == 0
    refused = gw.ssh(app, "run:detached", "sleep 30")
    assert refused.returncode == 1
    assert b"already runs 3 one-off dynos" in refused.stderr
    assert b"dynos.max_per_app" in refused.stderr
    assert gw.ssh(app, "echo nope").returncode == 1
    assert gw.ssh(other, "echo fine").stdout == b"fine\n"
    assert len(json.loads(gw.ssh(app, "run:list", "--json").stdout)) == 3


def test_usage_adds_up_dyno_seconds(own_gateway: Gateway) -> None:
    own_gateway.start()
    gw = own_gateway
    app = gw.new_app()
    gw.ssh(app, "sleep 1")
    gw.ssh(app, "sleep 2")
    gw.ssh(app, "exit 3")  # a failing dyno is billed too
    rows = json.loads(gw.cli("usage", app, "--json").stdout)
    assert [(r["app"], r["size"], r["dynos"]) for r in rows] == [(app, "standard-1x", 3)]
    assert 3 <= rows[0]["seconds"] < 3 + 3 * 1.0
    assert gw.cli("usage", "--since", "2999-01-01", "--json").stdout.strip() == "[]"


def test_attached_output_stays_out_of_the_log(gateway: Gateway) -> None:
    app = gateway.new_app()
    # The command line is logged, so the output must differ from it.
    assert gateway.ssh(app, "printf 'secret-%s\\n' output").stdout == b"secret-output\n"
    text = logs(gateway, app)
    assert "secret-output" not in text
    assert "heroku[run.1]: Process exited with status 0" in text


def test_run_logs_tail_follows_new_lines(gateway: Gateway) -> None:
    app = gateway.new_app()
    tail = subprocess.Popen(
        gateway.ssh_argv(app, "run:logs", "--tail"), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        time.sleep(1)
        gateway.ssh(app, "run:detached", "echo tailed-line")
        assert tail.stdout is not None
        seen = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            line = tail.stdout.readline().decode()
            seen.append(line)
            if "app[run.1]: tailed-line" in line:
                break
        assert any("app[run.1]: tailed-line" in line for line in seen), seen
    finally:
        tail.kill()
        tail.wait()
    # A reader that left while lines still flow must not harm the gateway.
    gateway.ssh(app, "run:detached", "echo after-the-reader-left")
    time.sleep(0.5)
    assert gateway.ssh(app, "echo still-serving").stdout == b"still-serving\n"


def test_ctrl_c_ends_a_tail_on_a_terminal(gateway: Gateway) -> None:
    app = gateway.new_app()
    tail = subprocess.Popen(
        gateway.ssh_argv(app, "run:logs", "--tail", tty=True),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert tail.stdin is not None
    time.sleep(1)
    tail.stdin.write(b"\x03")
    tail.stdin.flush()
    assert tail.wait(10) == 0


def test_reserved_command_mistakes_are_clear(gateway: Gateway) -> None:
    app = gateway.new_app()
    for command, message in [
        ("run:frobnicate", b"unknown command 'run:frobnicate'"),
        ("run:detached", b"no command given"),
        ("run:logs -n lots", b"-n takes a number"),
        ("run:detached --bogus x", b"unknown option '--bogus'"),
    ]:
        result = gateway.ssh(app, command)
        assert result.returncode == 1, command
        assert message in result.stderr, (command, result.stderr)
    help_text = gateway.ssh(app, "run:help")
    assert help_text.returncode == 0 and b"run:detached" in help_text.stdout


@pytest.mark.parametrize("admin", ["ps:stop", "logs"])
def test_admin_mirrors_reach_the_running_gateway(gateway: Gateway, admin: str) -> None:
    app = gateway.new_app()
    gateway.ssh(app, "run:detached", "echo via-admin; sleep 30")
    if admin == "ps:stop":
        assert wait_until(lambda: "run.1" in gateway.cli("ps", app).stdout, 5)
        assert "Stopping run.1" in gateway.cli("ps:stop", app, "run.1").stdout
        assert wait_until(lambda: "run.1" not in gateway.cli("ps", app).stdout, 10)
        refused = gateway.cli("ps:stop", app, "run.1", check=False)
        assert refused.returncode == 1 and "no running dyno run.1" in refused.stderr
    else:
        assert wait_until(lambda: "app[run.1]: via-admin" in gateway.cli("logs", app).stdout, 5)
