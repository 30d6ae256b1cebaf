"""The real heroku CLI (npm heroku@11) against the gateway: rendezvous, API, logs.

The CLI is installed from npm into .cache/heroku-cli on first use; CI reaches npm.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, Gateway, wait_until
from tests.test_interactive import Terminal

CLI_DIR = REPO / ".cache" / "heroku-cli"


@pytest.fixture(scope="session")
def heroku_bin() -> Path:
    binary = CLI_DIR / "node_modules" / ".bin" / "heroku"
    if not binary.exists():
        assert shutil.which("npm"), "npm is needed to install the heroku CLI (./dev installs it)"
        CLI_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(CLI_DIR), "heroku@11"],
            check=True,
            capture_output=True,
            timeout=900,
        )
    version = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout
    assert int(version.lstrip("v").split(".")[0]) >= 20, f"heroku@11 needs node 20+, not {version}"
    return binary


@dataclass
class Heroku:
    gateway: Gateway
    binary: Path
    app: str
    token: str

    @property
    def env(self) -> dict[str, str]:
        base = f"http://127.0.0.1:{self.gateway.api_port}"
        return {
            **os.environ,
            "PATH": f"{self.binary.parent}:{os.environ['PATH']}",
            "HEROKU_HOST": base,
            "HEROKU_PARTICLEBOARD_URL": base,
            "HEROKU_API_KEY": self.token,
            "NODE_EXTRA_CA_CERTS": str(self.gateway.root / "keys" / "rendezvous-ca.pem"),
            "DISABLE_TELEMETRY": "true",
            "HEROKU_SKIP_ANALYTICS": "1",
            "HEROKU_DISABLE_AUTOUPDATE": "1",  # else it spawns `heroku update` in the background
            "HOME": str(self.gateway.root),
        }

    def run(
        self, *args: str, stdin: object = subprocess.DEVNULL
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [str(self.binary), *args], env=self.env, stdin=stdin, capture_output=True, timeout=120
        )

    def api(
        self, method: str, path: str, body: object = None, token: str | None = None
    ) -> tuple[int, object]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.gateway.api_port}{path}",
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={
                "Authorization": f"Bearer {token or self.token}",
                "Accept": "application/vnd.heroku+json; version=3",
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())


def _heroku(gateway: Gateway, binary: Path) -> Heroku:
    app = gateway.new_app({"Procfile": "worker: echo working $1\n", "hello.txt": "hi\n"})
    token = gateway.cli("tokens:create", "--app", app).stdout.strip()
    return Heroku(gateway, binary, app, token)


@pytest.fixture
def heroku(gateway: Gateway, heroku_bin: Path) -> Heroku:
    return _heroku(gateway, heroku_bin)


def test_run_prints_output_and_passes_the_exit_status(heroku: Heroku) -> None:
    result = heroku.run("run", "-a", heroku.app, "--", "echo", "hi")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hi\n"
    failed = heroku.run("run", "-a", heroku.app, "--", "exit 3")
    assert failed.returncode == 3, failed.stderr
    flagged = heroku.run("run", "-x", "-a", heroku.app, "--", "exit 4")
    assert flagged.returncode == 4, flagged.stderr


def test_run_without_a_tty_pipes_a_file_through(heroku: Heroku, tmp_path: Path) -> None:
    source = tmp_path / "input.txt"
    source.write_bytes(
        b"".join(f"line {i} {secrets.token_hex(20)}\n".encode() for i in range(5000))
    )
    with source.open("rb") as stdin:
        result = heroku.run("run", "-a", heroku.app, "--no-tty", "--", "cat", stdin=stdin)
    assert result.returncode == 0, result.stderr
    assert result.stdout == source.read_bytes()


def test_detached_logs_ps_and_stop(heroku: Heroku) -> None:
    started = heroku.run("run:detached", "-a", heroku.app, "--", "echo detached-hello; sleep 60")
    assert started.returncode == 0, started.stderr
    name = re.search(rb"--dyno (run\.\d+)", started.stdout).group(1).decode()  # type: ignore[union-attr]

    def logged() -> str:
        return heroku.run("logs", "-a", heroku.app, "-p", name).stdout.decode()

    assert wait_until(lambda: f"app[{name}]: detached-hello" in logged(), 10), logged()
    listing = heroku.run("ps", "-a", heroku.app).stdout.decode()
    assert "=== run: one-off processes (1)" in listing
    assert re.search(
        rf"{re.escape(name)} \(Standard-1X\): up .*: echo detached-hello; sleep 60$", listing, re.M
    )
    # A session inside the dyno (ssh APP.run.N, as heroku ps:exec): ps says so.
    inside = subprocess.Popen(heroku.gateway.ssh_argv(f"{heroku.app}.{name}", "sleep 60"))
    try:
        assert wait_until(
            lambda: "sleep 60 (1 session)" in heroku.run("ps", "-a", heroku.app).stdout.decode(),
            20,
        )
    finally:
        inside.kill()
        inside.wait()
    stopped = heroku.run("ps:stop", name, "-a", heroku.app)
    assert stopped.returncode == 0, stopped.stderr
    assert wait_until(
        lambda: "No dynos on" in heroku.run("ps", "-a", heroku.app).stdout.decode(), 10
    )
    assert f"heroku[{name}]: Stopping all processes with SIGTERM" in logged()


def test_bash_on_a_terminal(heroku: Heroku, tmp_path: Path) -> None:
    env = " ".join(
        f"{k}='{v}'"
        for k, v in heroku.env.items()
        if k.startswith(("HEROKU", "NODE", "DISABLE", "PATH", "HOME"))
    )
    term = Terminal(
        tmp_path, ["sh", "-c", f"env {env} {heroku.binary} run -a {heroku.app} -- bash"]
    )
    try:
        term.wait_for(r"up, run\.\d+", timeout=30)
        term.line("echo MARK$((6*7)); stty size")
        term.wait_for(r"MARK42\s+30 100")
        term.line("sleep 100")
        time.sleep(0.5)
        term.send("C-c")
        term.line("echo BACK$((1+1))")
        term.wait_for("BACK2", timeout=5)
        term.line("exit")
        term.wait_for("EXIT=0", timeout=15)
    finally:
        term.close()


def test_tokens_are_checked_and_scoped_to_their_apps(heroku: Heroku, gateway: Gateway) -> None:
    status, body = heroku.api("GET", f"/apps/{heroku.app}", token="wrong-token")
    assert status == 401
    assert body == {"id": "unauthorized", "message": "Invalid credentials provided."}
    other = _heroku(gateway, heroku.binary)
    started = other.run("run:detached", "-a", other.app, "--", "sleep 30")
    assert started.returncode == 0
    for method, path in [
        ("GET", f"/apps/{other.app}"),
        ("GET", f"/apps/{other.app}/dynos"),
        ("GET", f"/apps/{other.app}/dynos/run.1"),
        ("POST", f"/apps/{other.app}/dynos/run.1/actions/stop"),
    ]:
        status, body = heroku.api(method, path)
        assert status == 404, (method, path)
        assert body["id"] == "not_found"  # type: ignore[index]
    assert other.api("GET", f"/apps/{other.app}/dynos")[1][0]["name"] == "run.1"  # type: ignore[index]
    other.api("POST", f"/apps/{other.app}/dynos/run.1/actions/stop")


@pytest.fixture
def short_attach(own_gateway: Gateway, heroku_bin: Path) -> Iterator[Heroku]:
    own_gateway.rendezvous_config = "attach_timeout = 2\n"
    own_gateway.write_config()
    own_gateway.start()
    yield _heroku(own_gateway, heroku_bin)


def _tls(gateway: Gateway) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(gateway.root / "keys" / "rendezvous-ca.pem"))
    raw = socket.create_connection(("127.0.0.1", gateway.rendezvous_port), timeout=10)
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


def _closed_without_a_word(sock: ssl.SSLSocket) -> bool:
    try:
        return sock.recv(100) == b""
    except (ConnectionError, ssl.SSLError):
        return True


def test_bad_rendezvous_clients_are_closed_and_r13_ends_unclaimed_dynos(
    short_attach: Heroku,
) -> None:
    hk = short_attach
    gw = hk.gateway
    status, dyno = hk.api("POST", f"/apps/{hk.app}/dynos", {"command": "echo x", "attach": True})
    assert status == 201
    attach_url = dyno["attach_url"]  # type: ignore[index]
    assert attach_url.startswith(f"rendezvous://127.0.0.1:{gw.rendezvous_port}/")
    secret = attach_url.rsplit("/", 1)[1]
    assert len(secret) >= 22  # 128 bits or more

    # The real secret works once (within attach_timeout); a second use is refused.
    with _tls(gw) as first:
        first.sendall(secret.encode() + b"\r\n")
        assert first.recv(100) == b"rendezvous\r\n"
        received = b""
        while b"heroku-command-exit-status" not in received:
            chunk = first.recv(4096)
            assert chunk
            received += chunk
        assert b"x" in received
    for line in [
        b"\x00\xff garbage\r\n",
        b"x" * 5000,
        secrets.token_urlsafe(24).encode() + b"\r\n",
    ]:
        with _tls(gw) as sock:
            sock.sendall(line)
            assert _closed_without_a_word(sock)
    with _tls(gw) as silent:  # sends nothing: closed after the handshake time
        started = time.monotonic()
        assert _closed_without_a_word(silent)
        assert time.monotonic() - started < 5
    with socket.create_connection(("127.0.0.1", gw.rendezvous_port)) as plain:
        plain.sendall(b"GET / HTTP/1.0\r\n\r\n")  # not even TLS
        plain.settimeout(10)
        try:
            answer = plain.recv(100)
        except ConnectionResetError:
            answer = b""
        assert b"rendezvous" not in answer and not plain.recv(100)

    with _tls(gw) as reused:
        reused.sendall(secret.encode() + b"\r\n")
        assert _closed_without_a_word(reused)

    # A dyno nobody attaches to ends as Heroku's do.
    status, unclaimed = hk.api(
        "POST", f"/apps/{hk.app}/dynos", {"command": "echo y", "attach": True}
    )
    name = unclaimed["name"]  # type: ignore[index]

    def logs() -> str:
        return gw.cli("logs", hk.app, "-p", name).stdout

    assert wait_until(lambda: "Process exited with status 128" in logs(), 10), logs()
    assert "Error R13 (Attach error) -> Failed to attach to process" in logs()
    assert hk.run("run", "-a", hk.app, "--", "echo", "unharmed").stdout == b"unharmed\n"


def test_a_command_too_long_for_exec_gets_an_http_error_not_a_drop(heroku: Heroku) -> None:
    body = {"command": "echo " + "x" * 200_000, "attach": False}
    status, answer = heroku.api("POST", f"/apps/{heroku.app}/dynos", body)
    assert status == 422, answer
    assert "more than the 131071 one process argument can hold" in answer["message"]  # type: ignore[index]
    body = {"command": "echo " + "x" * 600_000, "attach": False}
    status, answer = heroku.api("POST", f"/apps/{heroku.app}/dynos", body)
    assert status == 400 and "too large" in answer["message"]  # type: ignore[index]


def test_logplex_url_names_the_configured_host_whatever_the_host_header(heroku: Heroku) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{heroku.gateway.api_port}/apps/{heroku.app}/log-sessions",
        method="POST",
        data=json.dumps({"lines": 5}).encode(),
        headers={
            "Authorization": f"Bearer {heroku.token}",
            "Content-Type": "application/json",
            "Host": "attacker.example:80",  # a client could send a CLI anywhere with this
        },
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        url = json.loads(response.read())["logplex_url"]
    assert url.startswith(f"http://127.0.0.1:{heroku.gateway.api_port}/log-sessions/")
    with urllib.request.urlopen(url, timeout=30) as stream:  # and it works
        assert stream.status == 200
