"""`ssh APP@host CMD` behaves like a plain sshd, in a fresh one-off dyno each time."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import asyncssh
import paramiko
import pytest

from tests.conftest import Gateway


def test_stdout_stderr_and_exit_status_are_separate(gateway: Gateway) -> None:
    app = gateway.new_app()
    result = gateway.ssh(app, "echo hi; echo err >&2; exit 3")
    assert result.stdout == b"hi\n"
    assert result.stderr == b"err\n"
    assert result.returncode == 3


def test_20mb_of_random_bytes_come_back_identical(gateway: Gateway, tmp_path: Path) -> None:
    app = gateway.new_app()
    data = os.urandom(20 * 1024 * 1024)
    result = gateway.ssh(app, "cat", input=data)
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(result.stdout).hexdigest() == hashlib.sha256(data).hexdigest()


def test_stdin_from_a_file_reaches_eof(gateway: Gateway, tmp_path: Path) -> None:
    app = gateway.new_app()
    source = tmp_path / "input.bin"
    source.write_bytes(os.urandom(1_234_567))
    with source.open("rb") as stdin:
        result = gateway.ssh(app, "wc -c", stdin=stdin)
    assert result.stdout.strip() == b"1234567"
    assert result.returncode == 0


def test_binary_output_on_both_streams(gateway: Gateway) -> None:
    app = gateway.new_app()
    result = gateway.ssh(app, "printf '\\000\\377\\r\\n'; printf '\\001\\002' >&2")
    assert result.stdout == b"\x00\xff\r\n"
    assert result.stderr == b"\x01\x02"


def test_dyno_names_count_up_and_survive_a_restart(own_gateway: Gateway) -> None:
    own_gateway.start()
    app = own_gateway.new_app()
    assert own_gateway.ssh(app, "echo $DYNO").stdout == b"run.1\n"
    assert own_gateway.ssh(app, "echo $DYNO").stdout == b"run.2\n"
    own_gateway.restart()
    assert own_gateway.ssh(app, "echo $DYNO").stdout == b"run.3\n"


def test_each_dyno_gets_a_fresh_copy_of_the_release(gateway: Gateway) -> None:
    app = gateway.new_app({"hello.txt": "hello\n", "keep.txt": "keep\n"})
    first = gateway.ssh(app, "echo changed > hello.txt; rm keep.txt; touch new.txt; ls")
    assert first.stdout.split() == [b"hello.txt", b"new.txt"]
    second = gateway.ssh(app, "cat hello.txt; ls")
    assert second.stdout == b"hello\nhello.txt\nkeep.txt\n"


def test_environment_holds_config_vars_dyno_and_home(gateway: Gateway) -> None:
    app = gateway.new_app()
    gateway.cli("config:set", app, "DATABASE_URL=postgres://db/x", "GREETING=hi there")
    result = gateway.ssh(app, 'echo "$DATABASE_URL|$GREETING|$DYNO"; test "$HOME" = "$PWD"')
    assert result.stdout == b"postgres://db/x|hi there|run.1\n"
    assert result.returncode == 0


def test_files_a_dyno_makes_have_the_usual_modes(gateway: Gateway) -> None:
    # The gateway keeps its own state private (umask 077); a dyno gets sshd's 022.
    app = gateway.new_app()
    # In the dyno's home (its own copy of the release): the process sandbox shares /tmp.
    result = gateway.ssh(app, "umask; cd && touch f && mkdir d && stat -c %a f d")
    assert result.stdout == b"0022\n644\n755\n", result.stderr


def test_procfile_process_type_resolves_with_its_arguments(gateway: Gateway) -> None:
    app = gateway.new_app(
        {"Procfile": "worker: sh work.sh\n", "work.sh": 'echo "working on $1 in $DYNO"\n'}
    )
    result = gateway.ssh(app, "worker", "42")
    assert result.stdout == b"working on 42 in run.1\n"
    assert result.returncode == 0


def test_an_app_without_a_release_creates_no_dyno(gateway: Gateway) -> None:
    app = gateway.new_app(release=False)
    result = gateway.ssh(app, "echo $DYNO")
    assert result.returncode == 1
    assert b"has no release yet" in result.stderr
    assert result.stdout == b""
    slug = gateway.root / f"{app}-later.tgz"
    from tests.conftest import make_slug

    gateway.cli("releases:create", app, str(make_slug(slug, {"a": "b"})))
    assert gateway.ssh(app, "echo $DYNO").stdout == b"run.1\n"


def test_a_key_of_one_app_opens_nothing_for_another(gateway: Gateway, tmp_path: Path) -> None:
    app_a = gateway.new_app()
    app_b = gateway.new_app()
    other_key = tmp_path / "other"
    os.system(f"ssh-keygen -q -t ed25519 -N '' -f {other_key}")
    gateway.cli("keys:remove", app_b, _fingerprint(gateway.client_key))
    gateway.cli("keys:add", app_b, f"{other_key}.pub")
    assert gateway.ssh(app_b, "true", key=other_key).returncode == 0
    wrong_key = gateway.ssh(app_b, "true")  # app A's key
    unknown_app = gateway.ssh("no-such-app", "true")
    assert wrong_key.returncode == unknown_app.returncode == 255
    assert wrong_key.stderr.replace(app_b.encode(), b"X") == unknown_app.stderr.replace(
        b"no-such-app", b"X"
    )
    assert b"Permission denied (publickey)" in wrong_key.stderr
    assert gateway.ssh(app_a, "true").returncode == 0


def _fingerprint(key: Path) -> str:
    import subprocess

    out = subprocess.run(["ssh-keygen", "-lf", f"{key}.pub"], capture_output=True, text=True)
    return out.stdout.split()[1]


def test_passwords_and_forwarding_are_refused(gateway: Gateway) -> None:
    app = gateway.new_app()
    argv = gateway.ssh_argv(app, "true")
    argv[argv.index("BatchMode=yes")] = "PreferredAuthentications=password,keyboard-interactive"
    import subprocess

    refused = subprocess.run(argv, capture_output=True, timeout=30)
    assert refused.returncode == 255

    async def forward() -> None:
        async with gateway.connect(app) as conn:
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_connection("127.0.0.1", 22)
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 9)

    asyncio.run(forward())


def test_a_signal_death_comes_back_as_exit_signal(gateway: Gateway) -> None:
    app = gateway.new_app()

    async def run() -> asyncssh.SSHCompletedProcess:
        async with gateway.connect(app) as conn:
            return await conn.run("echo before; kill -TERM $$", check=False)

    result = asyncio.run(run())
    assert result.stdout == b"before\n" or result.stdout == "before\n"
    assert result.exit_signal is not None and result.exit_signal[0] == "TERM"


def test_paramiko_client_runs_a_command(gateway: Gateway) -> None:
    app = gateway.new_app()
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect(
        "127.0.0.1",
        port=gateway.port,
        username=app,
        key_filename=str(gateway.client_key),
        look_for_keys=False,
        allow_agent=False,
    )
    try:
        stdin, stdout, stderr = client.exec_command("cat; echo done >&2; exit 4")
        stdin.write(b"from paramiko")
        stdin.channel.shutdown_write()
        assert stdout.read() == b"from paramiko"
        assert stderr.read() == b"done\n"
        assert stdout.channel.recv_exit_status() == 4
    finally:
        client.close()


def test_a_long_command_runs_and_one_too_long_for_exec_is_refused_clearly(
    gateway: Gateway,
) -> None:
    """As long as one exec argument can be (128 KiB, OpenSSH's client has the same limit)
    runs; longer, which only a program can send, gets a clear error and exit status 1
    from the gateway, not a dropped session."""
    app = gateway.new_app()
    ran = gateway.ssh(app, "echo " + "x" * 100_000 + " | wc -c")
    assert (ran.returncode, ran.stdout) == (0, b"100001\n"), ran.stderr

    async def too_long() -> asyncssh.SSHCompletedProcess:
        async with gateway.connect(app) as conn:
            return await conn.run("echo " + "x" * 200_000)

    refused = asyncio.run(too_long())
    assert refused.exit_status == 1
    assert "gateway: the command is 200005 bytes, more than the 131071" in str(refused.stderr)
    assert "bash < script.sh" in str(refused.stderr)
    assert gateway.ssh(app, "echo ok").stdout == b"ok\n"  # and the gateway is fine
