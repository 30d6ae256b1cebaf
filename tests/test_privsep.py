"""Privilege separation (issue 12, item 1), as an operator would check it: the process
that parses untrusted bytes runs as its own unprivileged user with no capabilities,
no_new_privs and a syscall filter; it cannot open the database or the host keys; the
manager refuses other users on its socket; listeners are bound by the privileged side
(a low port works) or taken from systemd (LISTEN_FDS)."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Gateway, free_port, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="privilege separation needs root")
FRONT_USER = "gateway-front"  # the default [front] user, made by ./dev
NOBODY = 65534
# A Python every user can run (the venv's may live under /root, 0700).
SYSTEM_PYTHON = "/usr/bin/python3"


def front_pid(gw: Gateway) -> int:
    assert wait_until(lambda: any("SSH front ready pid=" in line for line in gw.log), 10)
    line = next(line for line in gw.log if "SSH front ready pid=" in line)
    match = re.search(r"pid=(\d+)", line)
    assert match is not None
    return int(match.group(1))


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def as_user(uid: int, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    entry = pwd.getpwuid(uid)
    return subprocess.run(
        [SYSTEM_PYTHON, "-c", code, *args],
        user=uid,
        group=entry.pw_gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_the_front_runs_as_its_own_user_with_nothing_to_escalate(
    reachable_gateway: Gateway,
) -> None:
    gw = reachable_gateway
    app = gw.new_app()
    gw.start()
    assert gw.ssh(app, "echo", "hi").stdout == b"hi\n"
    front = status(front_pid(gw))
    user = pwd.getpwnam(FRONT_USER)
    assert front["Uid"].split() == [str(user.pw_uid)] * 4  # real, effective, saved, fs
    assert front["Gid"].split() == [str(user.pw_gid)] * 4
    assert front["Groups"] == ""
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(front[caps], 16) == 0, caps
    assert front["NoNewPrivs"] == "1"
    assert front["Seccomp"] == "2"  # a filter
    manager = status(gw.process.pid)  # type: ignore[union-attr]
    assert manager["Uid"].split()[1] == "0"  # the privileged side keeps root
    assert not [line for line in gw.log if "imported after the front dropped" in line]


def test_the_front_holds_no_database_or_key_and_cannot_open_them(
    reachable_gateway: Gateway,
) -> None:
    gw = reachable_gateway
    app = gw.new_app()
    gw.start()
    assert gw.ssh(app, "true").returncode == 0
    pid = front_pid(gw)
    held = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    assert not [path for path in held if "gateway.db" in path or "ssh_host" in path]
    assert any(path.endswith("audit.jsonl") for path in held)  # handed over, append-only
    opener = (
        "import sys\n"
        "for path, mode in zip(sys.argv[1::2], sys.argv[2::2]):\n"
        "    try:\n"
        "        open(path, mode).close(); print('opened', path)\n"
        "    except PermissionError:\n"
        "        print('denied', path)\n"
    )
    db, key = gw.state_dir / "gateway.db", gw.root / "keys" / "ssh_host_ed25519_key"
    result = as_user(pwd.getpwnam(FRONT_USER).pw_uid, opener, str(db), "rb", str(db), "ab",
                     str(key), "rb", str(gw.root), "rb")  # fmt: skip
    assert result.stdout.splitlines()[:3] == [f"denied {db}", f"denied {db}", f"denied {key}"]


def _ask(path: Path, uid: int, app: str) -> subprocess.CompletedProcess[str]:
    """One ListDynos request on the manager's socket, as `uid`; prints the reply, or
    `closed` when the manager closed the connection instead."""
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
        "s.connect(sys.argv[1])\n"
        "try:\n"
        "    s.send(sys.argv[2].encode())\n"
        "    print(repr(s.recv(65536)) or 'closed')\n"
        "except (ConnectionResetError, BrokenPipeError):\n"
        "    print('closed')\n"
    )
    request = json.dumps({"type": "list_dynos", "app": app})
    return as_user(uid, code, str(path), request)


def test_the_manager_refuses_other_users_on_its_socket(reachable_gateway: Gateway) -> None:
    gw = reachable_gateway
    app = gw.new_app()
    gw.start()
    sock = gw.state_dir / "manager.sock"
    # An operator loosens the modes; the manager's own check still stands.
    gw.state_dir.chmod(0o755)
    sock.chmod(0o666)
    assert "dyno_list" in _ask(sock, 0, app).stdout  # the control: root is answered
    refused = _ask(sock, NOBODY, app)
    assert refused.stdout.strip() in ("b''", "closed"), refused.stderr  # not a word
    assert wait_until(
        lambda: any(f"manager connection refused uid={NOBODY}" in line for line in gw.log), 5
    )


def test_check_names_the_fronts_user_and_how_to_make_a_missing_one(
    reachable_gateway: Gateway,
) -> None:
    gw = reachable_gateway
    uid = pwd.getpwnam(FRONT_USER).pw_uid
    expected = f"ok   front: runs as {FRONT_USER} (uid {uid}), no capabilities"
    assert expected in gw.cli("check").stdout
    gw.top_config = '[front]\nuser = "no-such-front-user"\n'
    gw.write_config()
    result = gw.cli("check", check=False)
    hint = "useradd --system --no-create-home --shell /usr/sbin/nologin no-such-front-user"
    assert result.returncode == 1 and hint in result.stdout
    serve = gw.cli("serve", check=False)
    assert serve.returncode == 1
    assert serve.stderr.splitlines()[-1] == (
        "gateway: the front's user 'no-such-front-user' ([front] user) does not exist; "
        f"create it with: {hint}"
    )


def _free_low_port() -> int:
    for port in range(900, 1000):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.fail("no free port in 900-999 on 127.0.0.1")


def test_ssh_on_a_privileged_port_bound_by_the_manager(reachable_gateway: Gateway) -> None:
    gw = reachable_gateway
    gw.port = _free_low_port()
    gw.write_config()
    app = gw.new_app()
    gw.start()
    result = gw.ssh(app, "echo", "low")
    assert (result.returncode, result.stdout) == (0, b"low\n"), result.stderr


@pytest.fixture
def activated(reachable_gateway: Gateway) -> Iterator[tuple[Gateway, int]]:
    """The gateway under systemd-socket-activate, which binds the SSH port and passes it
    as systemd does (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES=ssh); the config names a
    port nobody binds, so a connection through the passed one proves it is used."""
    gw = reachable_gateway
    passed = free_port()
    activate = shutil.which("systemd-socket-activate")
    assert activate, "systemd-socket-activate (Debian: systemd) is needed"
    gw.launcher = [activate, "-l", f"127.0.0.1:{passed}", "--fdname=ssh", "-E", "PATH"]
    yield gw, passed


def _knock(port: int) -> None:
    """systemd-socket-activate starts the service at the first connection, as systemd
    does: make one (the front later accepts it and sees it gone)."""
    assert wait_until(lambda: _connects(port), 10)


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_listeners_passed_by_systemd_are_used(activated: tuple[Gateway, int]) -> None:
    gw, passed = activated
    app = gw.new_app()
    knocker = threading.Thread(target=_knock, args=(passed,))
    knocker.start()
    gw.start()
    knocker.join()
    result = subprocess.run(
        [arg if arg != str(gw.port) else str(passed) for arg in gw.ssh_argv(app, "echo", "sd")],
        capture_output=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout) == (0, b"sd\n"), result.stderr
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", gw.port), timeout=5).close()
    assert any(f"ssh listening on 127.0.0.1:{passed}" in line for line in gw.log)


def test_a_socket_passed_without_a_known_name_is_refused_clearly(
    reachable_gateway: Gateway,
) -> None:
    gw = reachable_gateway
    activate = shutil.which("systemd-socket-activate")
    assert activate
    port = free_port()
    process = subprocess.Popen(
        [activate, "-l", f"127.0.0.1:{port}", "--fdname=sshd", "-E", "PATH",
         sys.executable, "-m", "gateway", "--config", str(gw.config_path), "serve"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _knock(port)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1
    assert stderr.splitlines()[-1] == (
        "gateway: sockets passed by systemd: passed socket 1 is named 'sshd': name it "
        "with FileDescriptorName= one of ssh, rendezvous, api, metrics"
    )


def test_a_front_started_on_its_own_connects_by_path_and_may_restart(
    reachable_gateway: Gateway,
) -> None:
    """`[front] spawn = false`, as contrib/systemd runs it: the front is its own
    service, reaches the manager at `[front] socket`, and can restart alone."""
    gw = reachable_gateway
    run_dir = gw.root / "run"
    run_dir.mkdir(mode=0o755)
    sock = run_dir / "manager.sock"
    gw.top_config = f'[front]\nspawn = false\nsocket = "{sock}"\n'
    gw.write_config()
    app = gw.new_app()
    gw.start()
    assert any("waiting for the SSH front" in line for line in gw.log)
    info = sock.stat()
    assert (info.st_uid, oct(info.st_mode & 0o777)) == (pwd.getpwnam(FRONT_USER).pw_uid, "0o600")
    # In a network namespace of its own, as PrivateNetwork=yes runs it: the front makes
    # no network socket, it serves those it is handed.
    argv = ["unshare", "--net", sys.executable, "-m", "gateway", "--config",
            str(gw.config_path), "_front"]  # fmt: skip
    for attempt in range(2):
        front = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
        try:
            assert wait_until(lambda: gw.ssh(app, "echo", "up").stdout == b"up\n", 30), attempt
            assert status(front.pid)["Uid"].split()[0] == str(pwd.getpwnam(FRONT_USER).pw_uid)
        finally:
            front.terminate()
            assert front.wait(30) == 0
        assert gw.process is not None and gw.process.poll() is None  # the manager lives on
    front = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    assert wait_until(lambda: gw.ssh(app, "true").returncode == 0, 30)
    gw.stop()
    assert front.wait(30) == 0  # the manager gone, its lifeline ends the front
