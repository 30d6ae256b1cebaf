"""Settings: every key known, every type checked, errors name the key and the file."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from gateway.config import ConfigError, default_home, load, parse, with_port_base
from tests.conftest import REPO


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_HOME", raising=False)
    monkeypatch.chdir(tmp_path)  # the working directory plays no part
    config = parse({})
    assert config.ssh.listen == "127.0.0.1:2222"
    assert (config.dynos.idle_timeout, config.dynos.max_lifetime) == (3600, 86400)
    assert (config.dynos.stop_grace, config.dynos.sandbox) == (30, "auto")
    assert config.state_dir == REPO / "state"  # the checkout the gateway runs from
    assert config.keys_dir == REPO / "keys"
    assert default_home() == (REPO, "the checkout the gateway runs from")


def test_without_a_file_gateway_home_or_the_user_state_dir_holds_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    monkeypatch.setenv("GATEWAY_HOME", str(tmp_path / "home"))
    assert load().state_dir == tmp_path / "home" / "state"
    assert load().keys_dir == tmp_path / "home" / "keys"
    # An installed package (no checkout around it): $XDG_STATE_HOME/gateway.
    monkeypatch.delenv("GATEWAY_HOME")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    installed = tmp_path / "site-packages" / "gateway" / "config.py"
    assert default_home(installed)[0] == tmp_path / "xdg" / "gateway"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert default_home(installed)[0] == tmp_path / "user" / ".local" / "state" / "gateway"


def test_port_base_moves_every_enabled_listener() -> None:
    config = with_port_base(parse({"metrics": {"listen": ""}}), 3000)
    assert config.ssh.listen == "127.0.0.1:3000"
    assert config.rendezvous.listen == "127.0.0.1:3001"
    assert config.api.listen == "127.0.0.1:3002"
    assert config.metrics.listen == ""  # off stays off
    v6 = with_port_base(parse({"ssh": {"listen": "[::1]:22"}}), 4000)
    assert v6.ssh.host_port == ("::1", 4000)
    for bad in (0, 65533):
        with pytest.raises(ConfigError, match="--port-base must be from 1 to 65532"):
            with_port_base(parse({}), bad)


def test_public_ssh_address_is_what_users_type() -> None:
    assert parse({}).ssh.public_address == ("127.0.0.1", 2222)
    wildcard = parse({"ssh": {"listen": "0.0.0.0:22"}})
    assert wildcard.ssh.public_address == (socket.getfqdn(), 22)
    named = parse({"ssh": {"listen": "0.0.0.0:2222", "public_host": "gw.example.com"}})
    assert named.ssh.public_address == ("gw.example.com", 2222)
    forwarded = parse({"ssh": {"public_host": "gw.example.com", "public_port": 22}})
    assert forwarded.ssh.public_address == ("gw.example.com", 22)


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    config = load(write(tmp_path, 'state_dir = "s"\nkeys_dir = "/etc/k"\n'))
    assert config.state_dir == tmp_path / "s"
    assert config.keys_dir == Path("/etc/k")


def test_environment_variable_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_CONFIG", str(write(tmp_path, "[dynos]\nstop_grace = 5\n")))
    assert load().dynos.stop_grace == 5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[dynos]\nidle_timout = 5\n", "unknown key 'dynos.idle_timout'"),
        ("colour = 1\n", "unknown key 'colour'"),
        ('[dynos]\nidle_timeout = "1h"\n', "'dynos.idle_timeout' must be an integer"),
        ("[dynos]\nidle_timeout = true\n", "'dynos.idle_timeout' must be an integer"),
        ("[dynos]\nmax_lifetime = -1\n", "'dynos.max_lifetime' must not be negative"),
        (
            '[dynos]\nsandbox = "docker"\n',
            "'dynos.sandbox' must be one of auto, namespaces, bwrap, process",
        ),
        ('[dynos]\nuid_range = "5-10"\n', "'dynos.uid_range' must lie between 1000"),
        ('[dynos]\nuid_range = "many"\n', "'dynos.uid_range' must be FIRST-LAST"),
        ('[dynos]\nsubnet = "10.0.0.0/30"\n', "has room for too few dynos"),
        ('[dynos]\nsubnet = "fd00::/64"\n', "'dynos.subnet' must be an IPv4 network"),
        ('[dynos]\nsftp_server = "sftp-server"\n', "'dynos.sftp_server' must be an absolute"),
        ('[dynos]\nmax_size = "huge"\n', "'dynos.max_size' 'huge' is not a size"),
        ('[ssh]\nlisten = "2222"\n', "'ssh.listen': expected HOST:PORT"),
        ("ssh = 3\n", "'ssh' must be a table"),
        ("state_dir = 3\n", "'state_dir' must be a string"),
        ("[dynos\n", "not valid TOML"),
        ("[ssh]\npublic_port = 70000\n", "'ssh.public_port' must be a port number"),
        ('[ssh]\nproxy_protocol = "yes"\n', "'ssh.proxy_protocol' must be a bool"),
        ("[cluster]\nnode = 3\n", "'cluster.node' must be a str"),
        ('[cluster]\nagent_listen = "9465"\n', "'cluster.agent_listen': expected HOST:PORT"),
        ("[cluster]\nheartbeat = 30\n", "'cluster.heartbeat' must be at least 1 and below"),
        ("[cluster]\nheartbeat = 0\n", "'cluster.heartbeat' must be at least 1 and below"),
        ("[cluster]\nnodes = 3\n", "unknown key 'cluster.nodes'"),
    ],
)
def test_bad_settings_name_the_key_and_file(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load(path)
    assert str(error.value).startswith(f"{path}: ")
    assert message in str(error.value)


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load(tmp_path / "nope.toml")


def test_database_url_names_postgresql() -> None:
    assert parse({}).database_url == ""  # SQLite in state_dir
    url = "postgresql://gateway@db.internal:5432/gateway?sslmode=verify-full"
    assert parse({"database_url": url}).database_url == url


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://gateway:hunter2@db:5432/gateway",
        "postgres://:hunter2@db/gateway",
        "postgresql://gateway@db/gateway?sslmode=require&password=hunter2",
    ],
)
def test_a_database_url_with_a_password_is_refused(tmp_path: Path, url: str) -> None:
    path = write(tmp_path, f'database_url = "{url}"\n')
    with pytest.raises(ConfigError) as error:
        load(path)
    message = str(error.value)
    assert message.startswith(f"{path}: 'database_url' must not hold a password")
    assert "PGPASSWORD" in message and "~/.pgpass" in message and "passfile" in message
    assert "hunter2" not in message


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://gateway@db/gateway", "scheme 'mysql' is not PostgreSQL's"),
        ("/var/lib/gateway.db", "scheme '(none)' is not PostgreSQL's"),
        ("postgresql://gateway@[db/gateway", "'database_url' is not a URL"),
    ],
)
def test_a_database_url_that_is_not_postgresql_is_refused(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse({"database_url": url}, source="gw.toml")


def test_cluster_settings_and_the_attach_host(tmp_path: Path) -> None:
    default = load(write(tmp_path, ""))
    assert default.cluster.node_name == socket.gethostname()
    assert (default.cluster.heartbeat, default.cluster.dead_after) == (5, 30)
    assert default.cluster.agent_listen == "127.0.0.1:9465"
    assert not default.ssh.proxy_protocol and not default.api.proxy_protocol
    assert default.attach_host == "127.0.0.1"  # [rendezvous] public_host
    node = load(
        write(tmp_path, '[cluster]\nnode = "b"\npublic_host = "gw-b.example.com"\n'
              '[rendezvous]\nproxy_protocol = true\n')
    )  # fmt: skip
    assert node.cluster.node_name == "b"
    assert node.attach_host == "gw-b.example.com"
    assert node.rendezvous.proxy_protocol
