"""Interactive sessions: terminals, Ctrl-C, signals, hang-ups, the idle cutoff, the 24-hour cap.

OpenSSH's client runs on a real terminal inside tmux; asyncssh's client sends what
OpenSSH's cannot (signal requests).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Gateway, pids_with, wait_until


class Terminal:
    """A tmux window running a command on a real terminal of a known size."""

    def __init__(self, tmp_path: Path, command: list[str], cols: int = 100, rows: int = 30):
        self.socket = f"gw-test-{os.getpid()}-{time.monotonic_ns()}"
        conf = tmp_path / "tmux.conf"
        conf.write_text("set -g status off\nset -g history-limit 5000\n")
        script = " ".join(_quote(arg) for arg in command) + '; echo "EXIT=$?"; sleep 600'
        self._tmux(
            "-f", str(conf), "new-session", "-d", "-s", "t", "-x", str(cols), "-y", str(rows),
            "sh", "-c", script,
        )  # fmt: skip

    def _tmux(self, *args: str) -> str:
        result = subprocess.run(
            ["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=10
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    def send(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "t", *keys)

    def line(self, text: str) -> None:
        self._tmux("send-keys", "-t", "t", "-l", text)
        self._tmux("send-keys", "-t", "t", "Enter")

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-J", "-S", "-200", "-t", "t")

    def wait_for(self, pattern: str, timeout: float = 10) -> re.Match[str]:
        found: list[re.Match[str]] = []

        def seen() -> bool:
            match = re.search(pattern, self.screen())
            if match:
                found.append(match)
            return match is not None

        assert wait_until(seen, timeout), f"{pattern!r} not on screen:\n{self.screen()}"
        return found[-1]

    def resize(self, cols: int, rows: int) -> None:
        self._tmux("resize-window", "-t", "t", "-x", str(cols), "-y", str(rows))

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[list[Terminal]]:
    opened: list[Terminal] = []
    yield opened
    for term in opened:
        term.close()


def test_shell_on_a_terminal(gateway: Gateway, tmp_path: Path, terminal: list[Terminal]) -> None:
    app = gateway.new_app()
    term = Terminal(tmp_path, gateway.ssh_argv(app, tty=True))
    terminal.append(term)
    term.wait_for(r"attached to terminal\.\.\. up, run\.1")
    term.line("echo READY$((40+2))")
    term.wait_for("READY42")
    term.line("stty size")
    term.wait_for(r"(?m)^30 100\s*$")
    term.resize(120, 40)
    time.sleep(0.5)  # the window-change request travels client -> gateway -> PTY
    term.line("stty size")
    term.wait_for(r"(?m)^40 120\s*$")
    term.line("sleep 100")
    time.sleep(0.5)
    term.send("C-c")
    term.line("echo BACK$((2+3))")
    term.wait_for("BACK5", timeout=5)
    term.line("exit 7")
    term.wait_for("EXIT=7")


@pytest.mark.parametrize("tty", [False, True], ids=["pipes", "pty"])
def test_killing_the_client_ends_the_dyno(gateway: Gateway, tty: bool) -> None:
    app = gateway.new_app()
    marker = f"sleep 1000.{os.getpid()}{int(tty)}"
    client = subprocess.Popen(
        gateway.ssh_argv(app, marker, tty=tty),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # The dyno's own `sleep` (its command line starts with the marker), not a wrapper or
    # sandbox process that merely holds it in its arguments: the dyno is up.
    assert wait_until(lambda: pids_with(f"^{marker}"), 10)
    client.kill()
    client.wait()
    assert wait_until(lambda: not pids_with(marker), 2), "the dyno outlived its client"
    dynos = gateway.state_dir / "dynos"
    assert wait_until(lambda: not any(p.name.startswith(app + ".") for p in dynos.glob("*")), 5)
    logs = gateway.cli("logs", app, "-p", "run.1").stdout
    assert "heroku[run.1]: Process exited with status 129" in logs  # SIGHUP


@pytest.mark.parametrize("tty", [False, True], ids=["pipes", "pty"])
def test_a_process_trapping_hup_runs_on_detached(gateway: Gateway, tty: bool) -> None:
    app = gateway.new_app()
    client = subprocess.Popen(
        gateway.ssh_argv(app, "trap '' HUP; echo started; sleep 3; echo done", tty=tty),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert client.stdout is not None
    assert client.stdout.readline().rstrip(b"\r\n") == b"started"
    client.kill()
    client.wait()

    def logged() -> str:
        return gateway.cli("logs", app, "-p", "run.1").stdout

    assert wait_until(lambda: "Process exited with status 0" in logged(), 10), logged()
    lines = logged().splitlines()
    assert any(line.endswith(" app[run.1]: done") for line in lines), lines
    assert not any("app[run.1]: started" in line for line in lines)  # attached output
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00 heroku\[run\.1\]: ", lines[0])
    messages = [line.split(": ", 1)[1] for line in lines if "heroku[run.1]" in line]
    assert messages == [
        "Starting process with command `trap '' HUP; echo started; sleep 3; echo done`",
        "State changed from starting to up",
        "Process exited with status 0",
        "State changed from up to complete",
    ]


@pytest.fixture
def short_gateway(own_gateway: Gateway) -> Gateway:
    own_gateway.extra_config = "idle_timeout = 2\n"
    own_gateway.write_config()
    own_gateway.start()
    return own_gateway


def test_idle_sessions_are_cut_and_busy_ones_are_not(short_gateway: Gateway) -> None:
    gw = short_gateway
    app = gw.new_app()
    marker = f"cat; true idle-{os.getpid()}"  # bash -c keeps the marker in its command line
    started = time.monotonic()
    idle = subprocess.Popen(
        gw.ssh_argv(app, marker),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    idle.wait(timeout=10)  # stdin stays open and silent: only the cutoff ends this
    assert time.monotonic() - started < 3 + 1.5  # connection set-up included
    assert idle.stderr is not None and idle.stdin is not None
    err = idle.stderr.read()
    idle.stdin.close()
    assert b"no input or output for 2 s, closing the session" in err
    assert wait_until(lambda: not pids_with(marker), 2)
    busy = gw.ssh(app, "for i in 1 2 3 4 5; do echo $i; sleep 0.9; done")
    assert busy.returncode == 0
    assert busy.stdout == b"1\n2\n3\n4\n5\n"


def test_a_silent_client_is_noticed_by_keepalives(own_gateway: Gateway) -> None:
    """A client that stops answering (stopped process, lost network) is taken as gone
    after keepalive_interval * keepalive_count_max, and its dyno gets SIGHUP."""
    own_gateway.ssh_config = "keepalive_interval = 1\nkeepalive_count_max = 2\n"
    own_gateway.write_config()
    own_gateway.start()
    app = own_gateway.new_app()
    marker = f"sleep 1000.{os.getpid()}9"
    client = subprocess.Popen(
        own_gateway.ssh_argv(app, marker), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL
    )
    try:
        assert wait_until(lambda: pids_with(marker, client), 10)
        client.send_signal(signal.SIGSTOP)  # the TCP connection stays open, but silent
        stopped = time.monotonic()
        assert wait_until(lambda: not pids_with(marker, client), 8)
        assert time.monotonic() - stopped >= 1.5
    finally:
        client.kill()
        client.wait()
    assert "Process exited with status 129" in own_gateway.cli("logs", app).stdout


def test_max_lifetime_cycles_the_dyno(own_gateway: Gateway) -> None:
    own_gateway.extra_config = "max_lifetime = 3\nstop_grace = 1\n"
    own_gateway.write_config()
    own_gateway.start()
    app = own_gateway.new_app()
    started = time.monotonic()
    result = own_gateway.ssh(app, "sleep 100", timeout=30)
    took = time.monotonic() - started
    assert 2.5 < took < 6, took
    assert result.returncode == 255 or result.returncode == 143  # killed by SIGTERM
    logs = own_gateway.cli("logs", app).stdout
    assert "heroku[run.1]: Cycling" in logs
    assert "heroku[run.1]: Stopping all processes with SIGTERM" in logs
    assert "heroku[run.1]: Process exited with status 143" in logs


def test_max_lifetime_kills_what_ignores_sigterm(own_gateway: Gateway) -> None:
    own_gateway.extra_config = "max_lifetime = 2\nstop_grace = 1\n"
    own_gateway.write_config()
    own_gateway.start()
    app = own_gateway.new_app()
    result = own_gateway.ssh(app, "trap '' TERM; sleep 100 & wait; sleep 100", timeout=30)
    assert result.returncode == 255
    logs = own_gateway.cli("logs", app).stdout
    assert "Error R12 (Exit timeout)" in logs
    assert "heroku[run.1]: Process exited with status 137" in logs


def test_signal_requests_reach_the_dyno(gateway: Gateway) -> None:
    app = gateway.new_app()

    async def run() -> str:
        async with gateway.connect(app) as conn:
            process = await conn.create_process(
                "trap 'echo got USR1; exit 0' USR1; echo ready; while :; do sleep 0.1; done"
            )
            assert await asyncio.wait_for(process.stdout.readline(), 10) == "ready\n"
            process.send_signal("USR1")
            line = await asyncio.wait_for(process.stdout.readline(), 10)
            await asyncio.wait_for(process.wait(), 10)
            assert process.exit_status == 0
            return line

    assert asyncio.run(run()) == "got USR1\n"


def test_signals_outside_the_allow_list_are_refused(gateway: Gateway) -> None:
    app = gateway.new_app()

    async def run() -> str:
        async with gateway.connect(app) as conn:
            process = await conn.create_process(
                "trap 'echo got CONT' CONT; echo ready; sleep 1; echo finished"
            )
            await process.stdout.readline()
            process.send_signal("CONT")
            output = await asyncio.wait_for(process.stdout.read(), 10)
            return output

    assert asyncio.run(run()) == "finished\n"


def test_a_100kb_paste_through_the_pty_arrives_intact(gateway: Gateway) -> None:
    app = gateway.new_app()
    text = base64.encodebytes(os.urandom(75_000))  # ~100 KB in 76-column lines
    assert len(text) > 100_000

    async def run() -> str:
        async with gateway.connect(app) as conn:
            process = await conn.create_process(
                "stty -echo; cat > pasted; sha256sum pasted", term_type="xterm", encoding=None
            )
            await asyncio.sleep(0.3)  # let stty -echo happen first, as a person would
            process.stdin.write(text + b"\x04")
            output = await asyncio.wait_for(process.stdout.read(), 30)
            return output.decode()

    assert hashlib.sha256(text).hexdigest() in asyncio.run(run())


def test_exit_status_comes_after_the_last_output_byte(gateway: Gateway) -> None:
    app = gateway.new_app()
    for _ in range(5):
        result = gateway.ssh(app, "head -c 3000000 /dev/zero; echo tail; exit 9")
        assert result.returncode == 9
        assert len(result.stdout) == 3_000_005 and result.stdout.endswith(b"tail\n")


def test_banner_only_with_a_terminal(gateway: Gateway) -> None:
    app = gateway.new_app()
    plain = gateway.ssh(app, "echo hi")
    assert plain.stderr == b"" and plain.stdout == b"hi\n"
    with_tty = subprocess.run(
        gateway.ssh_argv(app, "echo hi", tty=True), capture_output=True, timeout=30
    )
    assert b"Running `echo hi` attached to terminal... up, run.2" in with_tty.stderr
