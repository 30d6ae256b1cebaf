"""Pure logic, without sockets or processes: names, keys, messages, dyno states."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest

from gateway.core.authorized_keys import BadKey, parse_line, parse_text
from gateway.core.dyno import BadTransition, Exit, State, transition
from gateway.core.environment import dyno_env
from gateway.core.names import (
    PLATFORM_VARS,
    InvalidName,
    check_app_name,
    check_config_key,
    check_config_var,
    parse_dyno_name,
)
from gateway.core.protocol import Pty
from gateway.core.terminal import escape_controls


@pytest.mark.parametrize("name", ["abc", "my-app-2", "a" * 30])
def test_app_names_heroku_accepts(name: str) -> None:
    assert check_app_name(name) == name


@pytest.mark.parametrize("name", ["ab", "a" * 31, "2app", "My-app", "my_app", "-app", "app!"])
def test_app_names_heroku_refuses(name: str) -> None:
    with pytest.raises(InvalidName, match="3-30 lowercase"):
        check_app_name(name)


def test_config_keys_are_environment_names() -> None:
    assert check_config_key("DATABASE_URL") == "DATABASE_URL"
    for bad in ("1X", "A-B", "", "A B"):
        with pytest.raises(InvalidName):
            check_config_key(bad)


def test_config_vars_refuse_the_names_the_gateway_sets_with_the_reason() -> None:
    assert check_config_var("DATABASE_URL") == "DATABASE_URL"
    assert check_config_var("PATH") == "PATH"  # a default the app may replace, as on Heroku
    assert check_config_var("dyno") == "dyno"  # environment names are case-sensitive
    # Exactly the names a dyno's environment overrides whatever the config vars say.
    attempt = {name: "from-config" for name in [*PLATFORM_VARS, "PATH", "HOME", "LANG", "X"]}
    env = dyno_env(
        name="run.1", config_vars=attempt, app_dir="/app", port=5000, pty=Pty("xterm", 80, 24)
    )
    assert set(PLATFORM_VARS) == {name for name in attempt if env[name] != "from-config"}
    with pytest.raises(InvalidName) as refused:
        check_config_var("DYNO")
    assert str(refused.value) == (
        "DYNO is set by the gateway and cannot be a config var: "
        "every dyno gets its own name there (run.N)"
    )
    for name in PLATFORM_VARS:
        with pytest.raises(InvalidName, match=f"^{name} is set by the gateway"):
            check_config_var(name)
    with pytest.raises(InvalidName, match="invalid config var name"):
        check_config_var("1X")


def test_dyno_names() -> None:
    assert parse_dyno_name("run.12") == 12
    assert parse_dyno_name("run.0") is None
    assert parse_dyno_name("web.1") is None


def test_key_fingerprint_matches_ssh_keygen(tmp_path: Path) -> None:
    key = tmp_path / "k"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "me@x", "-f", key], check=True
    )
    parsed = parse_line((tmp_path / "k.pub").read_text())
    listed = subprocess.run(["ssh-keygen", "-lf", f"{key}.pub"], capture_output=True, text=True)
    assert parsed.fingerprint == listed.stdout.split()[1]
    assert parsed.comment == "me@x"


def test_authorized_keys_text_skips_comments_and_refuses_options(tmp_path: Path) -> None:
    blob = base64.b64encode(b"\x00\x00\x00\x0bssh-ed25519" + b"\x00" * 36).decode()
    keys = parse_text(f"# a comment\n\nssh-ed25519 {blob} one\nssh-ed25519 {blob}\n")
    assert [k.comment for k in keys] == ["one", ""]
    with pytest.raises(BadKey, match="line 1: authorized_keys options are not supported"):
        parse_text(f'from="10.0.0.1" ssh-ed25519 {blob}\n')
    with pytest.raises(BadKey, match="does not match its key type"):
        parse_line(f"ssh-rsa {blob}")
    with pytest.raises(BadKey, match="not base64"):
        parse_line("ssh-ed25519 !!!")
    with pytest.raises(BadKey, match="no public key found"):
        parse_text("# nothing\n")


def test_dyno_states_never_come_back_from_an_end() -> None:
    assert transition(State.STARTING, State.UP) is State.UP
    assert transition(State.UP, State.COMPLETE) is State.COMPLETE
    with pytest.raises(BadTransition):
        transition(State.COMPLETE, State.UP)
    with pytest.raises(BadTransition):
        transition(State.CRASHED, State.STARTING)


def test_exit_from_returncode() -> None:
    assert Exit.from_returncode(3) == Exit(status=3)
    assert Exit.from_returncode(-9) == Exit(signal="KILL")
    assert Exit(signal="KILL").shell_status == 137
    assert Exit(signal="TERM").shell_status == 143


@pytest.mark.parametrize(
    "keygen",
    [
        ["-t", "ed25519"],  # OpenSSH's own format
        ["-t", "rsa", "-b", "2048", "-m", "PEM"],  # -----BEGIN RSA PRIVATE KEY-----
        ["-t", "ecdsa", "-m", "PKCS8"],  # -----BEGIN PRIVATE KEY-----
    ],
    ids=["openssh", "pem-rsa", "pkcs8"],
)
def test_a_private_key_is_refused_as_such(tmp_path: Path, keygen: list[str]) -> None:
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-N", "", *keygen, "-f", key], check=True)
    with pytest.raises(BadKey, match=r"^this is a private key.*give the public key"):
        parse_text(key.read_text())
    assert parse_text((tmp_path / "id.pub").read_text())  # its public half is fine


def test_control_characters_are_escaped_for_a_terminal() -> None:
    title = "\x1b]0;pwned\x07"
    clipboard = "\x1b]52;c;ZXZpbA==\x1b\\"
    assert escape_controls(f"{title}hi") == "\\x1b]0;pwned\\x07hi"
    assert escape_controls(clipboard) == "\\x1b]52;c;ZXZpbA==\\x1b\\"
    assert escape_controls("\x1b[2J\r\n\x00\x7f\x9b") == "\\x1b[2J\\x0d\\x0a\\x00\\x7f\\x9b"
    plain = "tab\tstays, so do ünïcödé and \\ backslashes"
    assert escape_controls(plain) == plain
