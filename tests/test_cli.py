"""The admin CLI against a real state dir: what an operator types and reads."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.store.schema import LATEST
from tests.conftest import Gateway, _gateway, free_port, make_slug


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[Gateway]:
    gateway = _gateway(tmp_path / "gw")
    yield gateway
    gateway.stop()


def test_apps_create_and_list(gw: Gateway) -> None:
    assert gw.cli("apps:create", "shop").stdout == "Created shop\n"
    gw.cli("apps:create", "blog")
    assert gw.cli("apps").stdout == "blog\nshop\n"
    listed = json.loads(gw.cli("apps", "--json").stdout)
    assert [app["name"] for app in listed] == ["blog", "shop"]
    again = gw.cli("apps:create", "shop", check=False)
    assert again.returncode == 1 and "already exists" in again.stderr
    bad = gw.cli("apps:create", "Shop_1", check=False)
    assert bad.returncode == 1 and "invalid app name 'Shop_1'" in bad.stderr


def test_releases_count_up_and_record_the_procfile(gw: Gateway, tmp_path: Path) -> None:
    gw.cli("apps:create", "shop")
    slug = make_slug(tmp_path / "s.tgz", {"Procfile": "worker: sh w.sh\n", "w.sh": "echo\n"})
    assert gw.cli("releases:create", "shop", str(slug)).stdout.startswith("Released v1 of shop")
    second = json.loads(gw.cli("releases:create", "shop", str(slug), "--json").stdout)
    assert second["version"] == 2 and second["procfile"] == {"worker": "sh w.sh"}
    listed = json.loads(gw.cli("releases", "shop", "--json").stdout)
    assert [r["version"] for r in listed] == [1, 2]
    assert (gw.state_dir / "releases" / "shop" / "v2" / "w.sh").read_text() == "echo\n"


def test_heroku_style_app_prefix_is_accepted(gw: Gateway, tmp_path: Path) -> None:
    gw.cli("apps:create", "shop")
    slug = make_slug(tmp_path / "s.tgz", {"Procfile": "web: x\n"}, prefix="./app/")
    gw.cli("releases:create", "shop", str(slug))
    assert (gw.state_dir / "releases" / "shop" / "v1" / "Procfile").exists()


def _tar(path: Path, *members: tuple[tarfile.TarInfo, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def _member(
    name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, link: str = ""
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, link
    return info


BAD_SLUGS = {
    "absolute": ((_member("/etc/evil"), b"x"),),
    "dotdot": ((_member("a/../../evil"), b"x"),),
    "symlink_out": ((_member("link", tarfile.SYMTYPE, link="../../etc/passwd"), b""),),
    "hardlink": ((_member("f"), b"x"), (_member("h", tarfile.LNKTYPE, link="f"), b"")),
    "device": ((_member("dev", tarfile.CHRTYPE), b""),),
    "fifo": ((_member("pipe", tarfile.FIFOTYPE), b""),),
    "setuid": ((_member("suid", mode=0o4755), b"x"),),
    "setgid": ((_member("sgid", mode=0o2755), b"x"),),
}


@pytest.mark.parametrize("kind", sorted(BAD_SLUGS))
def test_bad_slugs_are_refused_and_change_nothing(gw: Gateway, tmp_path: Path, kind: str) -> None:
    gw.cli("apps:create", "shop")
    gw.cli("releases:create", "shop", str(make_slug(tmp_path / "good.tgz", {"a": "b"})))
    before = gw.cli("releases", "shop", "--json").stdout
    bad = _tar(tmp_path / f"{kind}.tgz", *BAD_SLUGS[kind])
    result = gw.cli("releases:create", "shop", str(bad), check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("gateway: slug refused: ")
    assert gw.cli("releases", "shop", "--json").stdout == before
    assert sorted(os.listdir(gw.state_dir / "releases" / "shop")) == ["v1"]
    assert sorted(os.listdir(gw.state_dir / "slugs" / "shop")) == ["v1.tgz"]


def test_oversized_and_garbage_slugs_are_refused(gw: Gateway, tmp_path: Path) -> None:
    gw.config_path.write_text(gw.config_path.read_text() + "[slugs]\nmax_unpacked_bytes = 1000\n")
    gw.cli("apps:create", "shop")
    big = make_slug(tmp_path / "big.tgz", {"big.bin": b"\0" * 5000})
    result = gw.cli("releases:create", "shop", str(big), check=False)
    assert result.returncode == 1 and "slug refused" in result.stderr
    garbage = tmp_path / "garbage.tgz"
    garbage.write_text("this is not a tarball")
    result = gw.cli("releases:create", "shop", str(garbage), check=False)
    assert result.returncode == 1 and "not a gzipped tar archive" in result.stderr
    assert gw.cli("releases", "shop", "--json").stdout.strip() == "[]"


def test_config_vars_set_unset_and_show(gw: Gateway) -> None:
    gw.cli("apps:create", "shop")
    gw.cli("config:set", "shop", "A=1", "B=two=2", "EMPTY=")
    assert json.loads(gw.cli("config", "shop", "--json").stdout) == {
        "A": "1",
        "B": "two=2",
        "EMPTY": "",
    }
    gw.cli("config:unset", "shop", "A")
    assert gw.cli("config", "shop").stdout == "B=two=2\nEMPTY=\n"
    bad = gw.cli("config:set", "shop", "1BAD=x", check=False)
    assert bad.returncode == 1 and "invalid config var name" in bad.stderr
    missing = gw.cli("config", "nope-app", check=False)
    assert missing.returncode == 1 and "no such app: 'nope-app'" in missing.stderr


def test_config_set_refuses_the_names_the_gateway_sets(gw: Gateway) -> None:
    gw.cli("apps:create", "shop")
    for name in ("DYNO", "PWD", "TERM"):
        refused = gw.cli("config:set", "shop", "A=1", f"{name}=x", check=False)
        assert refused.returncode == 1
        assert refused.stderr.startswith(f"gateway: {name} is set by the gateway and cannot be")
        assert "Set" not in refused.stdout
    assert gw.cli("config", "shop").stdout == ""  # nothing half-set


def test_keys_add_list_remove(gw: Gateway, tmp_path: Path) -> None:
    gw.cli("apps:create", "shop")
    pub = Path(f"{gw.client_key}.pub")
    added = gw.cli("keys:add", "shop", str(pub)).stdout
    fingerprint = added.split()[1]
    assert fingerprint.startswith("SHA256:")
    assert "Already there" in gw.cli("keys:add", "shop", str(pub)).stdout
    assert json.loads(gw.cli("keys", "shop", "--json").stdout)[0]["fingerprint"] == fingerprint
    junk = tmp_path / "junk.pub"
    junk.write_text("ssh-ed25519 not-base64!\n")
    bad = gw.cli("keys:add", "shop", str(junk), check=False)
    assert bad.returncode == 1 and "line 1: key data is not base64" in bad.stderr
    gw.cli("keys:remove", "shop", fingerprint)
    assert gw.cli("keys", "shop").stdout == ""
    gone = gw.cli("keys:remove", "shop", fingerprint, check=False)
    assert gone.returncode == 1


def test_keys_add_given_a_private_key_says_so(gw: Gateway, tmp_path: Path) -> None:
    gw.cli("apps:create", "shop")
    private = gw.cli("keys:add", "shop", str(gw.client_key), check=False)
    assert private.returncode == 1
    key = gw.client_key
    assert private.stderr == f"gateway: {key} is a private key: did you mean {key}.pub?\n"
    alone = tmp_path / "lone_key"
    alone.write_bytes(gw.client_key.read_bytes())  # no .pub next to it
    private = gw.cli("keys:add", "shop", str(alone), check=False)
    assert private.returncode == 1
    assert private.stderr.startswith(f"gateway: {alone}: this is a private key")
    assert "ssh-keygen -y -f" in private.stderr
    assert "PRIVATE" not in private.stderr + private.stdout  # its text is never echoed
    assert gw.cli("keys", "shop").stdout == ""


def test_host_keys_are_private_printed_and_never_replaced(gw: Gateway) -> None:
    gw.start()
    gw.stop()
    keys = gw.root / "keys"
    first = {
        name: (keys / name).read_bytes() for name in ("ssh_host_ed25519_key", "ssh_host_rsa_key")
    }
    for name in first:
        assert stat.S_IMODE((keys / name).stat().st_mode) == 0o600
    assert any(line.startswith("host key ssh-ed25519 SHA256:") for line in gw.log)
    gw.start()
    assert {name: (keys / name).read_bytes() for name in first} == first


def test_check_reports_each_part_and_fails_on_a_taken_port(gw: Gateway) -> None:
    fresh = gw.cli("check")
    assert fresh.returncode == 0, fresh.stdout
    lines = fresh.stdout.splitlines()
    assert lines[0].startswith("ok   config: ")
    assert any(line.startswith("ok   state: ") for line in lines)
    assert any("sandbox in force" in line for line in lines)
    gw.start()  # now the gateway holds its ports
    busy = gw.cli("check", check=False)
    assert busy.returncode == 1
    assert f"FAIL ssh.listen 127.0.0.1:{gw.port}: cannot listen" in busy.stdout
    gw.stop()


def test_check_says_where_state_lives(gw: Gateway) -> None:
    lines = gw.cli("check").stdout.splitlines()
    assert lines[1] == (
        f"ok   state in {gw.state_dir}, keys in {gw.root / 'keys'} (from {gw.config_path})"
    )


def _gateway_cli(*args: str, cwd: Path, home: Path) -> subprocess.CompletedProcess[str]:
    """`gateway ARGS` with no config file, run from `cwd`."""
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_CONFIG"}
    env["GATEWAY_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_without_a_config_file_every_directory_sees_the_same_state(tmp_path: Path) -> None:
    home, here, there = tmp_path / "home", tmp_path / "here", tmp_path / "there"
    for directory in (home, here, there):
        directory.mkdir()
    assert _gateway_cli("apps:create", "shop", cwd=here, home=home).returncode == 0
    assert _gateway_cli("apps", cwd=there, home=home).stdout == "shop\n"
    assert (home / "state" / "gateway.db").exists()
    assert not any(here.iterdir()) and not any(there.iterdir())  # no stray state/
    check = _gateway_cli("check", cwd=there, home=home).stdout.splitlines()
    assert check[1] == (
        f"ok   state in {home / 'state'}, keys in {home / 'keys'} "
        f"(built-in defaults; {home} is $GATEWAY_HOME)"
    )


LISTENERS = ("ssh", "rendezvous", "api", "metrics")


def _port_of(gw: Gateway, table: str) -> int:
    return {
        "ssh": gw.port,
        "rendezvous": gw.rendezvous_port,
        "api": gw.api_port,
        "metrics": gw.metrics_port,
    }[table]


def _occupied(port: int) -> socket.socket:
    """A listening socket on `port`, as another program would hold it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


@pytest.mark.parametrize("table", LISTENERS)
def test_a_taken_port_names_its_listener_and_how_to_move_it(gw: Gateway, table: str) -> None:
    port = _port_of(gw, table)
    with _occupied(port):
        result = gw.cli("serve", check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"gateway: [{table}] listen 127.0.0.1:{port}: address already in use; "
        f"set [{table}] listen in {gw.config_path}"
    )
    assert "Traceback" not in result.stderr and "front exited" not in result.stderr


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("192.0.2.1", "cannot assign requested address"),  # TEST-NET-1: not on this host
        ("no-such-host.invalid", ""),  # the resolver's own words
    ],
)
def test_a_listen_address_not_on_this_host_is_named(gw: Gateway, host: str, reason: str) -> None:
    text = gw.config_path.read_text()
    gw.config_path.write_text(text.replace(f"127.0.0.1:{gw.port}", f"{host}:{gw.port}"))
    result = gw.cli("serve", check=False)
    assert result.returncode == 1
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"gateway: [ssh] listen {host}:{gw.port}: {reason}"), last
    assert last.endswith(f"; set [ssh] listen in {gw.config_path}")
    assert "Traceback" not in result.stderr


def test_demo_on_a_taken_port_tells_of_port_base(gw: Gateway) -> None:
    with _occupied(gw.api_port):
        result = gw.cli("demo", check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"gateway: [api] listen 127.0.0.1:{gw.api_port}: address already in use; "
        "move all four listeners with --port-base N (SSH on N, the others on N+1 to N+3), "
        f"or set [api] listen in {gw.config_path}"
    )
    assert "Traceback" not in result.stderr


def _free_run_of_ports(count: int) -> int:
    """The first of `count` consecutive free loopback ports."""
    for _ in range(50):
        base = free_port()
        if base + count <= 65535 and all(_bindable(base + i) for i in range(count)):
            return base
    raise AssertionError(f"no {count} consecutive free ports found")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_demo_port_base_moves_its_ports_and_prints_lines_that_work_anywhere(
    gw: Gateway, tmp_path: Path
) -> None:
    base = _free_run_of_ports(4)
    demo = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--config", str(gw.config_path), "demo",
         "--port-base", str(base)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        assert demo.stderr is not None
        for line in demo.stderr:
            lines.append(line.rstrip())
            if "Ctrl-C here stops the gateway" in line:
                break
        ssh_line = next(line.strip() for line in lines if line.strip().startswith("ssh "))
        assert f" -p {base} demo@127.0.0.1" in ssh_line
        for port in range(base + 1, base + 4):  # rendezvous, API, metrics
            assert not _bindable(port), port
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        result = subprocess.run(
            ["sh", "-c", ssh_line], cwd=elsewhere, capture_output=True, timeout=60,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert (result.returncode, result.stdout) == (0, b"hello from run.1\n"), result.stderr
    finally:
        demo.send_signal(signal.SIGINT)
        assert demo.wait(30) == 0, "\n".join(lines)


def test_db_migrate_and_check_report_the_schema_version(gw: Gateway) -> None:
    db = gw.state_dir / "gateway.db"
    fresh = gw.cli("check")
    assert (
        f"ok   state: SQLite {db} (schema v0, migrates to v{LATEST} at start or with "
        "`gateway db:migrate`)"
    ) in fresh.stdout.splitlines()
    assert gw.cli("db:migrate").stdout == f"SQLite {db}: schema v{LATEST} (migrated from v0)\n"
    assert gw.cli("db:migrate").stdout == f"SQLite {db}: schema v{LATEST} (up to date)\n"
    gw.cli("apps:create", "shop")
    assert f"ok   state: SQLite {db} (schema v{LATEST}, 1 apps)" in gw.cli("check").stdout
