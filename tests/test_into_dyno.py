"""Into a running dyno (docs/exec.md) with the real OpenSSH client: `ssh APP.run.N` runs a
process inside the dyno, `scp`, `sftp` and `rsync` move its files, `ssh -L`/`-D` reach
its ports; in both sandboxes that run as root here (namespaces, process), where each
property applies."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Gateway, _client_key, _gateway, free_port, wait_until

SANDBOXES = ("process", "namespaces")


@pytest.fixture(scope="module", params=SANDBOXES)
def gw(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    gateway = _gateway(tmp_path_factory.mktemp(f"into-{request.param}"))
    text = gateway.config_path.read_text()
    gateway.config_path.write_text(text.replace('"process"', f'"{request.param}"'))
    gateway.start()
    assert any(f"sandbox in force: {request.param}" in line for line in gateway.log)
    yield gateway
    gateway.stop()
    # Everything the front ran for these sessions was loaded before it dropped its
    # privileges (gateway/front/imports.py).
    assert not [line for line in gateway.log if "imported after the front dropped" in line]


def sandbox_of(gw: Gateway) -> str:
    return "namespaces" if any("in force: namespaces" in line for line in gw.log) else "process"


def detached(gw: Gateway, app: str, command: str) -> str:
    """Start `command` in a detached dyno; its name."""
    result = gw.ssh(app, "run:detached", command)
    assert result.returncode == 0, result.stderr
    match = re.search(rb"up, (run\.\d+)", result.stdout)
    assert match is not None, result.stdout
    return match.group(1).decode()


def options(gw: Gateway, key: Path | None = None) -> list[str]:
    """The ssh options every client here uses (scp and sftp take the port as -P)."""
    argv = gw.ssh_argv("x", key=key)
    return [arg for arg in argv[1:-1] if arg not in ("-p", str(gw.port))]


def client(
    gw: Gateway, *argv: str, input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(list(argv), input=input, capture_output=True, timeout=60)


def audit(gw: Gateway) -> list[dict[str, object]]:
    return [json.loads(line) for line in (gw.state_dir / "audit.jsonl").read_text().splitlines()]


def app_log(gw: Gateway, app: str, dyno: str) -> str:
    return gw.ssh(app, "run:logs", "-p", dyno).stdout.decode()


def until_written(gw: Gateway, target: str, path: str) -> None:
    assert wait_until(lambda: gw.ssh(target, f"test -s {path}").returncode == 0, 20)


# -- a process inside the dyno ------------------------------------------------------------


def test_a_command_runs_inside_the_dyno_as_the_dyno(gw: Gateway) -> None:
    app = gw.new_app()
    gw.cli("config:set", app, "SECRET=s3cret")
    # What the dyno's own process is: its namespaces, cgroup, user, environment, dir.
    me = (
        "readlink /proc/self/ns/mnt /proc/self/ns/net /proc/self/ns/pid /proc/self/ns/uts"
        " /proc/self/ns/ipc /proc/self/ns/cgroup; cat /proc/self/cgroup; id; hostname; pwd;"
        " env | grep -E '^(DYNO|PORT|HOME|SECRET)=' | sort"
    )
    dyno = detached(gw, app, f"({me}) > me.txt; echo written > log.txt; exec sleep 600")
    target = f"{app}.{dyno}"
    until_written(gw, target, "log.txt")

    inside = gw.ssh(target, me)
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout == gw.ssh(target, "cat me.txt").stdout
    assert b"SECRET=s3cret" in inside.stdout and f"DYNO={dyno}".encode() in inside.stdout
    if sandbox_of(gw) == "namespaces":
        assert b"uid=100000(u100000)" in inside.stdout  # the app's own user, by name too
        # The files written for it are its to read, whatever the manager's umask.
        readable = gw.ssh(target, "test -r /etc/resolv.conf -a -r /etc/group && echo readable")
        assert readable.stdout == b"readable\n", readable.stderr

    # Separate streams, stdin, the exit status, as any session.
    result = gw.ssh(target, "cat log.txt; echo to-stderr >&2; wc -c; exit 3", input=b"four")
    assert (result.returncode, result.stdout, result.stderr) == (3, b"written\n4\n", b"to-stderr\n")
    # With a terminal: the dyno's environment, the client's TERM.
    tty = subprocess.run(
        gw.ssh_argv(target, "test -t 0 && echo terminal $DYNO $TERM", tty=True),
        capture_output=True, timeout=60, env={**os.environ, "TERM": "vt220"},
    )  # fmt: skip
    assert tty.stdout == f"terminal {dyno} vt220\r\n".encode(), tty.stderr
    # A shell on a terminal, typed into.
    shell = subprocess.run(gw.ssh_argv(target, tty=True), input=b"echo in-$DYNO; exit 5\n",
                           capture_output=True, timeout=60)  # fmt: skip
    assert shell.returncode == 5 and f"in-{dyno}\r\n".encode() in shell.stdout, shell

    # The entered processes' ends did not end the dyno.
    assert f"{dyno} (Standard-1X): up".encode() in gw.ssh(app, "run:list").stdout
    events = [e for e in audit(gw) if e.get("app") == app and e["event"] == "exec_start"]
    assert {e.get("command") for e in events} >= {
        "cat me.txt",
        "cat log.txt; echo to-stderr >&2; wc -c; exit 3",
    }
    assert all(e["dyno"] == dyno for e in events)


def test_an_unknown_or_ended_dyno_is_named_with_status_1(gw: Gateway) -> None:
    app = gw.new_app()
    for user, words in (
        (f"{app}.run.99", f"{app} has no dyno run.99"),
        (f"{app}.web.1", "'web.1' is not a dyno name"),
    ):
        result = gw.ssh(user, "true")
        assert result.returncode == 1, result
        assert words in result.stderr.decode(), result.stderr
    assert gw.ssh(app, "true").returncode == 0  # run.1, ended at once
    ended = gw.ssh(f"{app}.run.1", "true")
    assert ended.returncode == 1 and b"run.1 of " in ended.stderr and b"has ended" in ended.stderr
    sftp = client(gw, "sftp", "-P", str(gw.port), *options(gw), "-b", "-",
                  f"{app}.run.99@127.0.0.1", input=b"ls\n")  # fmt: skip
    assert sftp.returncode != 0 and b"no dyno run.99" in sftp.stderr, sftp.stderr


def test_another_apps_dyno_with_this_apps_key_fails_like_a_wrong_key(gw: Gateway) -> None:
    theirs = gw.new_app()  # with the test's key, for run:detached
    dyno = detached(gw, theirs, "exec sleep 600")
    their_key = _client_key(gw.root, "their-key")
    gw.cli("keys:add", theirs, f"{their_key}.pub")
    gw.cli("keys:remove", theirs, _fingerprint(gw.client_key))
    mine = gw.new_app(release=False)  # the test's key is now this app's only
    assert gw.ssh(f"{mine}.run.1", "true").returncode == 1  # it logs in there
    stranger = _client_key(gw.root, "stranger")  # no app's key
    with_my_key = gw.ssh(f"{theirs}.{dyno}", "true")
    with_no_key = gw.ssh(f"{theirs}.{dyno}", "true", key=stranger)
    no_app = gw.ssh(f".{dyno}", "true")  # no app at all before the dot
    assert with_my_key.returncode == with_no_key.returncode == no_app.returncode == 255

    def refusal(result: subprocess.CompletedProcess[bytes]) -> bytes:
        return re.sub(rb"^\S*@127\.0\.0\.1: ", b"", result.stderr)  # less the user name

    assert refusal(with_my_key) == refusal(with_no_key) == refusal(no_app)
    assert b"Permission denied (publickey)" in with_my_key.stderr
    assert gw.ssh(f"{theirs}.{dyno}", "echo in", key=their_key).stdout == b"in\n"


def _fingerprint(key: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", f"{key}.pub"], capture_output=True, text=True)
    return out.stdout.split()[1]


# The process sandbox has no namespaces: its dynos, entered or not, see the host.
@pytest.mark.parametrize("gw", ["namespaces"], indirect=True)
def test_an_exec_sees_only_its_own_dyno(gw: Gateway) -> None:
    app, other = gw.new_app(), gw.new_app()
    dyno = detached(gw, app, "exec sleep 701")
    detached(gw, app, "exec sleep 702")
    detached(gw, other, "exec sleep 703")
    result = gw.ssh(f"{app}.{dyno}", "ps -e -o pid=,args=")
    processes = [line.split(None, 1) for line in result.stdout.decode().splitlines()]
    # Its init (pid 1), its command, and the entered process: no other dyno, no host.
    assert [pid for pid, _ in processes][:1] == ["1"], processes
    args = [args.split()[0] for _, args in processes]
    assert args == ["dyno-init", "sleep", "ps"] and processes[1][1] == "sleep 701", processes


def test_the_dyno_ending_ends_what_was_entered_and_a_hang_up_ends_an_entered_process(
    gw: Gateway,
) -> None:
    app = gw.new_app()
    dyno = detached(gw, app, "exec sleep 600")
    target = f"{app}.{dyno}"
    marker = f"sleep {os.getpid() % 1000 + 3000}"
    # A client that goes away: its process inside the dyno is hung up.
    gone = subprocess.Popen(gw.ssh_argv(target, marker), stdout=subprocess.PIPE)
    assert wait_until(lambda: marker.encode() in gw.ssh(target, "ps -e -o args=").stdout, 20)
    gone.kill()
    gone.wait()
    assert wait_until(lambda: marker.encode() not in gw.ssh(target, "ps -e -o args=").stdout, 20)
    # The dyno stopped: every process entered into it ends, and its clients with it.
    shell = subprocess.Popen(gw.ssh_argv(target, tty=True), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    plain = subprocess.Popen(gw.ssh_argv(target, "sleep 300"), stdout=subprocess.PIPE)
    assert wait_until(lambda: b"2 sessions" in gw.ssh(app, "run:list").stdout, 20), gw.ssh(
        app, "run:list"
    ).stdout
    assert gw.ssh(app, "run:stop", dyno).returncode == 0
    assert plain.wait(30) != 0 and shell.wait(30) != 0
    assert wait_until(lambda: dyno.encode() not in gw.ssh(app, "run:list").stdout, 20)


def test_run_list_and_the_api_count_the_sessions_inside_a_dyno(gw: Gateway) -> None:
    app = gw.new_app()
    dyno = detached(gw, app, "exec sleep 600")
    token = gw.cli("tokens:create", "--app", app).stdout.strip()

    def api_dynos() -> list[dict[str, object]]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{gw.api_port}/apps/{app}/dynos",
            headers={"Authorization": f"Bearer {token}",
                     "Accept": "application/vnd.heroku+json; version=3"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]

    assert gw.ssh(app, "run:list").stdout.decode().splitlines()[1].endswith(": exec sleep 600")
    session = subprocess.Popen(gw.ssh_argv(f"{app}.{dyno}", "sleep 120"))
    try:
        assert wait_until(lambda: b"(1 session)" in gw.ssh(app, "run:list").stdout, 20)
        listed = json.loads(gw.ssh(app, "run:list", "--json").stdout)
        assert (listed[0]["sessions"], listed[0]["forwarded_connections"]) == (1, 0)
        body = api_dynos()[0]
        assert body["command"] == "exec sleep 600 (1 session)" and body["sessions"] == 1
    finally:
        session.kill()
        session.wait()
    assert wait_until(lambda: api_dynos()[0]["sessions"] == 0, 20)


# -- files ----------------------------------------------------------------------------------


def test_files_move_both_ways_with_scp_sftp_and_rsync(gw: Gateway, tmp_path: Path) -> None:
    app = gw.new_app({"hello.txt": "hello from the release\n"})
    dyno = detached(
        gw, app,
        "echo payload-from-the-dyno > out.txt;"
        " while [ ! -s up.txt ]; do sleep 0.1; done; echo \"dyno saw: $(cat up.txt)\";"
        " exec sleep 600",
    )  # fmt: skip
    remote = f"{app}.{dyno}@127.0.0.1"
    until_written(gw, f"{app}.{dyno}", "out.txt")
    scp = ["scp", "-P", str(gw.port), *options(gw)]
    rsync_ssh = " ".join(["ssh", "-p", str(gw.port), *options(gw)])

    # Out of the dyno: scp (SFTP, OpenSSH's default), scp -O (the old protocol), sftp, rsync.
    got = {name: tmp_path / name for name in ("scp", "scp-O", "sftp", "rsync")}
    assert client(gw, *scp, f"{remote}:out.txt", str(got["scp"])).returncode == 0
    assert client(gw, *scp, "-O", f"{remote}:out.txt", str(got["scp-O"])).returncode == 0
    batch = f"get out.txt {got['sftp']}\n".encode()
    sftp = client(gw, "sftp", "-P", str(gw.port), *options(gw), "-b", "-", remote, input=batch)
    assert sftp.returncode == 0, sftp.stderr
    rsync = client(gw, "rsync", "-e", rsync_ssh, f"{remote}:out.txt", str(got["rsync"]))
    assert rsync.returncode == 0, rsync.stderr
    for path in got.values():
        assert path.read_text() == "payload-from-the-dyno\n", path

    # Into it, seen by the dyno's own process.
    (tmp_path / "up.txt").write_text("uploaded by scp\n")
    assert client(gw, *scp, str(tmp_path / "up.txt"), f"{remote}:up.txt").returncode == 0
    assert wait_until(lambda: "dyno saw: uploaded by scp" in app_log(gw, app, dyno), 20)
    (tmp_path / "more.txt").write_text("more\n")
    assert client(gw, *scp, "-O", str(tmp_path / "more.txt"), f"{remote}:o.txt").returncode == 0
    put = f"put {tmp_path / 'more.txt'} s.txt\n".encode()
    assert client(gw, "sftp", "-P", str(gw.port), *options(gw), "-b", "-", remote,
                  input=put).returncode == 0  # fmt: skip
    assert client(gw, "rsync", "-e", rsync_ssh, str(tmp_path / "more.txt"),
                  f"{remote}:r.txt").returncode == 0  # fmt: skip
    assert gw.ssh(f"{app}.{dyno}", "cat o.txt s.txt r.txt").stdout == b"more\n" * 3

    # `sftp APP@HOST`: a fresh dyno, with the release's files.
    fresh = tmp_path / "hello.txt"
    batch = f"get hello.txt {fresh}\n".encode()
    sftp = client(gw, "sftp", "-P", str(gw.port), *options(gw), "-b", "-", f"{app}@127.0.0.1",
                  input=batch)  # fmt: skip
    assert sftp.returncode == 0 and fresh.read_text() == "hello from the release\n", sftp.stderr

    # The audit trail: each file and its bytes, as the dyno's sftp-server saw them.
    transfers = [e for e in audit(gw) if e["event"] == "file_transfer" and e["app"] == app]
    seen = {(Path(str(e["path"])).name, e["bytes_read"], e["bytes_written"]) for e in transfers}
    assert seen >= {("out.txt", 22, 0), ("up.txt", 0, 16), ("s.txt", 0, 5), ("hello.txt", 23, 0)}
    commands = {
        e.get("command") for e in audit(gw) if e["event"] == "exec_start" and e["app"] == app
    }
    assert any(str(c).startswith("scp -f") for c in commands)  # scp -O's, with its path
    assert any(str(c).startswith("rsync --server") for c in commands)


# -- port forwarding ----------------------------------------------------------------------


SERVE = "echo $DYNO > who.txt; exec python3 -m http.server --bind 127.0.0.1 $PORT >/dev/null 2>&1"


def _forward(gw: Gateway, user: str, *spec: str) -> subprocess.Popen[bytes]:
    """`ssh -N` with forwards; it says why a channel failed (LogLevel INFO)."""
    argv = [arg.replace("LogLevel=ERROR", "LogLevel=INFO") for arg in gw.ssh_argv(user)]
    return subprocess.Popen([*argv[:-1], "-N", *spec, argv[-1]], stderr=subprocess.PIPE)


def _curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args], capture_output=True,
                          timeout=30)  # fmt: skip


def _port_of(gw: Gateway, app: str, dyno: str) -> int:
    return int(gw.ssh(f"{app}.{dyno}", "echo $PORT").stdout)


def _serving(gw: Gateway, app: str, dyno: str) -> None:
    probe = "exec 3<>/dev/tcp/127.0.0.1/$PORT"
    assert wait_until(lambda: gw.ssh(f"{app}.{dyno}", probe).returncode == 0, 20)


@pytest.fixture
def host_server() -> Iterator[int]:
    """A server on the host's own loopback, which no forward into a dyno may reach."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nthe host\n")
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield port
    server.close()


def test_a_forward_reaches_the_dyno_s_port_and_nothing_else(gw: Gateway, host_server: int) -> None:
    app = gw.new_app()
    dyno, neighbour = detached(gw, app, SERVE), detached(gw, app, SERVE)
    _serving(gw, app, dyno)
    _serving(gw, app, neighbour)
    port = _port_of(gw, app, dyno)
    local, socks = free_port(), free_port()
    forward = _forward(gw, f"{app}.{dyno}", "-L", f"{local}:localhost:{port}", "-D", str(socks))
    try:
        url = f"http://127.0.0.1:{local}/who.txt"
        assert wait_until(lambda: _curl(url).stdout == f"{dyno}\n".encode(), 20)
        via_socks = _curl(
            "--socks5-hostname", f"127.0.0.1:{socks}", f"http://localhost:{port}/who.txt"
        )
        assert via_socks.stdout == f"{dyno}\n".encode(), via_socks.stderr
        # Not the dyno's loopback: refused before any connection is made.
        elsewhere = _curl("--socks5-hostname", f"127.0.0.1:{socks}", f"http://127.0.0.2:{port}/")
        assert elsewhere.returncode != 0 and elsewhere.stdout == b""
        if sandbox_of(gw) == "namespaces":
            # Every dyno's $PORT is 5000 in its own network: this one's is its own; the
            # host's loopback is not the dyno's.
            assert port == _port_of(gw, app, neighbour) == 5000
            host = _curl(
                "--socks5-hostname", f"127.0.0.1:{socks}", f"http://localhost:{host_server}/"
            )
            assert host.returncode != 0 and b"the host" not in host.stdout
    finally:
        forward.kill()
        forward.wait()
    events = [e for e in audit(gw) if e.get("app") == app]
    ends = [e for e in events if e["event"] == "forward_end" and e["target"] == f"localhost:{port}"]
    assert ends and all(e["dyno"] == dyno and int(e["bytes_out"]) > 0 for e in ends)  # type: ignore[call-overload]
    assert any(
        e["event"] == "forward_refused" and e["target"] == f"127.0.0.2:{port}" for e in events
    )


def test_forwarding_is_refused_without_a_dyno_and_other_forwarding_always(
    gw: Gateway, tmp_path: Path
) -> None:
    app = gw.new_app()
    dyno = detached(gw, app, SERVE)
    _serving(gw, app, dyno)
    port, local = _port_of(gw, app, dyno), free_port()
    forward = _forward(gw, app, "-L", f"{local}:localhost:{port}")
    try:
        assert wait_until(lambda: _curl(f"http://127.0.0.1:{local}/").returncode not in (7,), 20)
        refused = _curl(f"http://127.0.0.1:{local}/who.txt")
        assert refused.returncode != 0 and refused.stdout == b""
    finally:
        forward.kill()
        _, stderr = forward.communicate()
    assert b"port forwarding reaches into a running dyno only" in stderr, stderr
    assert any(
        e["event"] == "forward_refused" and e["app"] == app and "dyno" not in e for e in audit(gw)
    )
    remote = subprocess.run(
        [*gw.ssh_argv(f"{app}.{dyno}")[:-1], "-N", "-o", "ExitOnForwardFailure=yes",
         "-R", f"0:localhost:{port}", f"{app}.{dyno}@127.0.0.1"],
        capture_output=True, timeout=30,
    )  # fmt: skip
    assert remote.returncode == 255 and b"remote port forwarding failed" in remote.stderr.lower()
    x11 = subprocess.run([*gw.ssh_argv(f"{app}.{dyno}")[:-1], "-X", f"{app}.{dyno}@127.0.0.1",
                          "echo ${DISPLAY:-no display}"], capture_output=True, timeout=30,
                         env={**os.environ, "DISPLAY": ":99"})  # fmt: skip
    assert x11.stdout == b"no display\n" and b"X11 forwarding request failed" in x11.stderr
    agent_socket = tmp_path / "agent"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(agent_socket)],
                             stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        assert wait_until(agent_socket.exists, 10)
        agent_asked = subprocess.run(
            [*gw.ssh_argv(f"{app}.{dyno}")[:-1], "-A", f"{app}.{dyno}@127.0.0.1",
             "echo ${SSH_AUTH_SOCK:-no agent}"], capture_output=True, timeout=30,
            env={**os.environ, "SSH_AUTH_SOCK": str(agent_socket)},
        )  # fmt: skip
        assert agent_asked.stdout == b"no agent\n", agent_asked.stderr
    finally:
        agent.kill()
        agent.wait()


def test_the_dyno_ending_closes_its_forwarded_connections(gw: Gateway) -> None:
    app = gw.new_app()
    dyno = detached(gw, app, SERVE)
    _serving(gw, app, dyno)
    port, local = _port_of(gw, app, dyno), free_port()
    forward = _forward(gw, f"{app}.{dyno}", "-L", f"{local}:localhost:{port}")
    try:
        assert wait_until(lambda: _curl(f"http://127.0.0.1:{local}/who.txt").returncode == 0, 20)
        held = socket.create_connection(("127.0.0.1", local), timeout=30)
        held.sendall(b"GET /who.txt HTTP/1.1\r\nHost: x\r\n")  # an unfinished request
        assert wait_until(lambda: b"1 forwarded connection" in gw.ssh(app, "run:list").stdout, 20)
        started = time.monotonic()
        assert gw.ssh(app, "run:stop", dyno).returncode == 0
        assert held.recv(100) == b""  # closed, not left hanging
        assert time.monotonic() - started < 20
        held.close()
    finally:
        forward.kill()
        forward.wait()


def test_without_an_sftp_server_sftp_is_refused_and_check_says_why(own_gateway: Gateway) -> None:
    own_gateway.extra_config = 'sftp_server = "/nonexistent/sftp-server"\n'
    own_gateway.write_config()
    check = own_gateway.cli("check", check=False)
    assert check.returncode == 1
    assert (
        "FAIL sftp: /nonexistent/sftp-server is not installed (Debian: apt-get install "
        "openssh-sftp-server); or set [dynos] sftp_server" in check.stdout
    ), check.stdout
    own_gateway.start()
    app = own_gateway.new_app()
    dyno = detached(own_gateway, app, "exec sleep 600")
    for user in (app, f"{app}.{dyno}"):
        sftp = client(own_gateway, "sftp", "-P", str(own_gateway.port), *options(own_gateway),
                      "-b", "-", f"{user}@127.0.0.1", input=b"ls\n")  # fmt: skip
        assert sftp.returncode != 0
        assert b"gateway: sftp is not available on this gateway" in sftp.stderr, sftp.stderr
    assert "run.2" not in own_gateway.ssh(app, "run:list").stdout.decode()  # no dyno was made
