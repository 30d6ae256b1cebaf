"""The bubblewrap sandbox (`sandbox = "bwrap"`): isolation, limits, networking, cleanup.

Everything here runs real bwrap, real cgroups and the OpenSSH client against a real
gateway; nothing is skipped for want of bwrap (./dev installs bubblewrap and slirp4netns).
The pure pieces (argv, cgroup file parsing) are tested first, without processes.
"""

from __future__ import annotations

import contextlib
import inspect
import ipaddress
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gateway.config import SizeSettings
from gateway.core.environment import dyno_env
from gateway.core.protocol import Pty
from gateway.manager import bwrap_args as bw
from gateway.manager import limits, veth
from gateway.manager.namespace_spec import NamespaceSpec, encode_words, spec_words
from gateway.manager.sandbox import DynoSpec
from gateway.manager.stack import StackEntry
from tests import test_exec, test_interactive
from tests.conftest import Gateway, NetnsHost, _gateway, make_slug, wait_until
from tests.test_interactive import Terminal

# A size small enough to exceed quickly: 64 MB, 64 processes, half a core.
TINY = "[sizes.tiny]\nmemory = 64\npids = 64\ncpu = 0.5\n"


# Pure pieces


def test_limits_follow_the_size() -> None:
    got = limits.limits_for(SizeSettings(memory=512, pids=256, cpu=1.5))
    assert got == limits.Limits(512 * 1024 * 1024, 256, 150_000, 100_000)


def test_v1_writes_memory_before_memory_and_swap() -> None:
    lim = limits.Limits(64 << 20, 64, 50_000)
    assert limits.v1_settings(lim, memsw=True) == [
        ("memory", "memory.limit_in_bytes", str(64 << 20)),
        ("memory", "memory.memsw.limit_in_bytes", str(64 << 20)),
        ("pids", "pids.max", "64"),
        ("cpu", "cpu.cfs_period_us", "100000"),
        ("cpu", "cpu.cfs_quota_us", "50000"),
    ]
    assert ("memory", "memory.memsw.limit_in_bytes", str(64 << 20)) not in limits.v1_settings(
        lim, memsw=False
    )
    v2 = dict(limits.v2_settings(lim, swap=True))
    assert v2 == {
        "memory.max": str(64 << 20),
        "memory.swap.max": "0",
        "memory.oom.group": "1",
        "pids.max": "64",
        "cpu.max": "50000 100000",
    }


def test_proc_cgroup_and_mountinfo_are_parsed() -> None:
    v1, v2 = limits.parse_proc_cgroup(
        "12:pids:/user.slice\n4:cpu,cpuacct:/a/b\n3:memory:/a\n1:name=systemd:/x\n0::/a/b\n"
    )
    assert v1 == {
        "pids": "/user.slice", "cpu": "/a/b", "cpuacct": "/a/b", "memory": "/a",
        "name=systemd": "/x",
    }  # fmt: skip
    assert v2 == "/a/b"
    mountinfo = (
        "30 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct\n"
        "31 25 0:27 /outer /sys/fs/cgroup/mem\\040ory rw - cgroup cgroup rw,memory\n"
        "32 25 0:28 / /sys/fs/cgroup/unified rw shared:9 - cgroup2 cgroup2 rw\n"
        "33 25 0:29 / /proc rw - proc proc rw\n"
    )
    mounts, unified = limits.parse_cgroup_mounts(mountinfo)
    assert mounts["cpu"].mountpoint == Path("/sys/fs/cgroup/cpu,cpuacct")
    assert mounts["memory"] == limits.CgroupMount(Path("/sys/fs/cgroup/mem ory"), "/outer")
    assert "pids" not in mounts and unified is not None
    assert unified.mountpoint == Path("/sys/fs/cgroup/unified")
    # A mount of a subtree: the group path is taken relative to what is mounted.
    assert limits.group_dir(mounts["memory"], "/outer/gw") == Path("/sys/fs/cgroup/mem ory/gw")
    assert limits.group_dir(mounts["cpu"], "/a/b") == Path("/sys/fs/cgroup/cpu,cpuacct/a/b")


def test_oom_kills_are_read_from_v1_and_v2_files() -> None:
    assert limits.oom_kills("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n") == 2
    assert limits.oom_kills("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n") == 1
    assert limits.oom_kills("oom_kill_disable 0\nunder_oom 0\n") == 0  # before Linux 4.13


def test_parent_group_is_per_state_dir() -> None:
    one, two = limits.parent_name(Path("/srv/a")), limits.parent_name(Path("/srv/b"))
    assert one != two and one == limits.parent_name(Path("/srv/a"))
    assert re.fullmatch(r"gateway-[0-9a-f]{12}", one)


def test_stack_binds_dirs_and_recreates_symlinks() -> None:
    entries = [StackEntry("/usr"), StackEntry("/bin", "usr/bin")]
    assert bw.stack_args(entries) == ["--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin"]


def test_gateway_paths_inside_the_stack_are_covered() -> None:
    entries = [StackEntry("/etc"), StackEntry("/usr"), StackEntry("/lib", "usr/lib")]
    hidden = bw.hidden_args(
        entries,
        [
            ("/etc/gateway/keys", True),
            ("/etc/gateway.toml", False),
            ("/var/lib/gateway", True),  # not in the stack: nothing to cover
            ("/etcetera/x", True),  # a prefix of the name is not a parent
        ],
    )
    assert hidden == [
        "--tmpfs", "/etc/gateway/keys", "--ro-bind", "/dev/null", "/etc/gateway.toml",
    ]  # fmt: skip


def _spec(**changes: object) -> DynoSpec:
    fields: dict[str, object] = {
        "app": "shop",
        "name": "run.7",
        "command": "rake db:migrate",
        "config_vars": {"DATABASE_URL": "postgres://secret@db/x", "PATH": "/app/bin:/usr/bin"},
        "pty": None,
        "release_dir": Path("/state/releases/shop/v3"),
    }
    fields.update(changes)
    return DynoSpec(**fields)  # type: ignore[arg-type]


def test_bwrap_options_isolate_and_carry_the_environment() -> None:
    layout = bw.Layout(app="/tmp/app", tmp_bytes=1 << 20)
    args = bw.bwrap_args(
        hostname="run.7",
        stack=[StackEntry("/usr")],
        hidden=["--tmpfs", "/usr/gw"],
        layout=layout,
        network="host",
        env=_env(),
    )
    joined = " ".join(args)
    for flag in (
        "--unshare-user --uid 65534 --gid 65534 --disable-userns",
        "--unshare-pid --unshare-ipc --unshare-uts",
        "--hostname run.7",
        "--die-with-parent",
        "--as-pid-1",
        "--cap-drop ALL",
        "--ro-bind /usr /usr --tmpfs /usr/gw",
        "--size 1048576 --tmpfs /tmp",
        "--bind /tmp/app /app --chdir /app --clearenv",
        "--setenv DATABASE_URL postgres://secret@db/x",
        "--setenv HOME /app",
        "--setenv DYNO run.7",
    ):
        assert flag in joined
    assert "--unshare-net" not in args  # the host's network, without root
    assert "--" not in args  # options only: the command goes on the command line
    none = bw.bwrap_args(
        hostname="run.7",
        stack=[],
        hidden=[],
        layout=bw.Layout("/w/app", 4096),
        network="none",
        env={},
    )
    assert "--unshare-net" in none
    assert " ".join(none).count("--size 4096 --tmpfs /tmp") == 1


def _env(config_vars: dict[str, str] | None = None, pty: Pty | None = None) -> dict[str, str]:
    spec = _spec()
    return dyno_env(
        name=spec.name,
        config_vars=spec.config_vars if config_vars is None else config_vars,
        app_dir="/app",
        port=5000,
        pty=pty,
    )


def test_config_vars_may_set_path_but_not_the_dyno_name_or_port() -> None:
    env = _env({"PATH": "/app/bin", "DYNO": "web.1", "PORT": "80"})
    assert env["PATH"] == "/app/bin" and env["DYNO"] == "run.7" and env["PWD"] == "/app"
    assert env["PORT"] == "5000"
    pty_env = _env(pty=Pty(term="screen", cols=80, rows=24))
    assert (pty_env["TERM"], pty_env["COLUMNS"], pty_env["LINES"]) == ("screen", "80", "24")


def test_wrapper_argv_sets_limits_then_runs_bwrap_with_the_init() -> None:
    tools = {name: f"/bin/{name}" for name in bw.TOOLS}
    inner = bw.inner_argv(12, ["--ctty", "--control", "13"], "/bin/bash", "echo hi")
    argv = bw.wrapper_argv(tools, inner)
    assert argv[:3] == ["/bin/sh", "-c", bw.WRAPPER_SCRIPT]
    assert argv[3:] == [
        "dyno", "/bin/bwrap", "--args", "4", "--",
        "/proc/self/fd/12", "--ctty", "--control", "13", "--", "/bin/bash", "-c", "echo hi",
    ]  # fmt: skip


def test_a_namespace_spec_says_everything_the_init_builds() -> None:
    spec = NamespaceSpec(
        uid=100007, gid=100007, root=Path("/s/dynos/shop.ab"), budget=1 << 20,
        lower=Path("/s/releases/shop/v3"), own_network=True,
        cgroup_procs=("/sys/fs/cgroup/memory/g/x/cgroup.procs",),
        stack=(StackEntry("/usr"), StackEntry("/bin", "usr/bin")),
        hidden=(("/etc/gateway", True), ("/etc/gateway.toml", False)),
        files=(("/etc/resolv.conf", "nameserver 192.0.2.1\n"),),
        veth=veth.link_for(ipaddress.IPv4Network("10.199.0.0/16"), "gwab12", 5),
    )  # fmt: skip
    words = spec_words(spec)
    assert " ".join(words[:10]) == (
        "uid 100007 gid 100007 root /s/dynos/shop.ab budget 1048576 net own"
    )
    for expected in (
        "lower /s/releases/shop/v3", "cgroup /sys/fs/cgroup/memory/g/x/cgroup.procs",
        "ro /usr", "symlink usr/bin /bin", "hide-dir /etc/gateway",
        "hide-file /etc/gateway.toml", "rlimit NOFILE 10000 10000", "rlimit CORE 0 0",
        "veth gwab12-5 10.199.0.21 10.199.0.22",
    ):  # fmt: skip
        assert expected in " ".join(words), expected
    assert "DATA" not in words  # a memory cgroup caps it
    assert encode_words(["a", "b c"]) == b"a\0b c\0"
    with pytest.raises(ValueError, match="NUL"):
        encode_words(["a\0b"])


def test_the_dynos_network_table_and_addresses() -> None:
    subnet = ipaddress.IPv4Network("10.199.0.0/16")
    link = veth.link_for(subnet, "gwab12", 5)
    assert (link.host_name, link.host_address, link.dyno_address) == (
        "gwab12-5", "10.199.0.21", "10.199.0.22",
    )  # fmt: skip
    with pytest.raises(veth.NetworkError, match="no room"):
        veth.link_for(ipaddress.IPv4Network("10.0.0.0/29"), "gwab12", 2)
    rules = veth.ruleset("gateway_gwab12", "gwab12", subnet)
    for rule in (
        'iifname "gwab12-*" ip daddr 10.199.0.0/16 drop',  # dyno to dyno
        'oifname "gwab12-*" ct state established,related accept',  # replies only...
        'oifname "gwab12-*" drop',  # ...nothing new in
        'iifname "gwab12-*" drop',  # no address of the host
        'ip saddr 10.199.0.0/16 oifname != "gwab12-*" masquerade',
    ):
        assert rule in rules, rule


def test_dynos_get_the_name_servers_they_can_reach() -> None:
    stub = "nameserver 127.0.0.53\nsearch corp.example\n"
    upstream = "nameserver 192.0.2.53\nnameserver ::1\nsearch corp.example\n"
    assert veth.upstream_resolv_conf([stub, upstream]) == (
        "nameserver 192.0.2.53\nsearch corp.example\n"
    )
    assert veth.upstream_resolv_conf([stub]) is None


def test_bwrap_args_refuse_nul_bytes() -> None:
    assert bw.encode_args(["--setenv", "A", "b"]) == b"--setenv\0A\0b\0"
    with pytest.raises(ValueError, match="NUL"):
        bw.encode_args(["--setenv", "A", "b\0c"])


# A real gateway with the namespaces sandbox (the default as root)


def _sandboxed(gw: Gateway, sandbox: str = "namespaces") -> Gateway:
    """Switch a test gateway's config to another sandbox."""
    text = gw.config_path.read_text()
    assert 'sandbox = "process"' in text
    gw.config_path.write_text(text.replace('sandbox = "process"', f'sandbox = "{sandbox}"'))
    return gw


# Prepared sandboxes last 3 s unused here, so that "nothing left" can be waited for.
QUICK_IDLE = "prepared_idle = 3\n"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One namespaces gateway (network outbound) for the tests that do not reconfigure it."""
    root = tmp_path_factory.mktemp("namespaces")
    gateway = _sandboxed(_gateway(root, extra_config=QUICK_IDLE + TINY))
    gateway.start()
    yield gateway
    gateway.stop()


def _cgroup_parents(gw: Gateway) -> list[Path]:
    """The gateway's parent group dirs, from its log line at start."""
    line = next(line for line in gw.log if "sandbox in force: namespaces" in line)
    memory = Path(re.search(r"cgroup v1 under (\S+?)\)", line).group(1))  # type: ignore[union-attr]
    name = memory.name
    return [memory, Path("/sys/fs/cgroup/pids") / name, Path("/sys/fs/cgroup/cpu") / name]


def _dyno_groups(gw: Gateway) -> list[Path]:
    """Every dyno's group, prepared ones included."""
    found = []
    for parent in _cgroup_parents(gw):
        found += [p for p in parent.glob("*") if p.is_dir()] if parent.exists() else []
    return found


def _nothing_left(gw: Gateway) -> bool:
    """No dyno, prepared or running, has anything left on the host."""
    return not _dyno_groups(gw) and not any((gw.state_dir / "dynos").iterdir())


def test_serve_says_which_sandbox_is_in_force(gw: Gateway) -> None:
    line = next(line for line in gw.log if "sandbox in force" in line)
    assert "namespaces" in line and "kernel NAT" in line and "cgroup" in line, line
    assert "weaker" not in line, line


def test_a_dyno_sees_only_itself_as_its_apps_own_user(gw: Gateway) -> None:
    app, other = gw.new_app(), gw.new_app()
    result = gw.ssh(app, "ps ax -o pid=,args=; hostname; id -u; id -G")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    processes = [line.split(None, 1) for line in lines[:-3]]
    # The dyno's init is pid 1; then the shell and ps: no host process, no other dyno.
    assert [args.split()[0] for _, args in processes] == ["dyno-init", "/bin/bash", "ps"]
    assert processes[0][0] == "1"
    hostname, uid, groups = lines[-3:]
    assert hostname == "run.1" and int(uid) >= 100000 and groups == uid  # the app's own
    other_uid = gw.ssh(other, "id -u").stdout.decode().strip()
    assert other_uid != uid and int(other_uid) >= 100000  # another app, another uid
    assert gw.ssh(app, "id -u").stdout.decode().strip() == uid  # and it stays the app's


def test_the_gateway_is_out_of_sight(gw: Gateway) -> None:
    app, other = gw.new_app(), gw.new_app({"secret.txt": "other app\n"})
    busy = subprocess.Popen(
        gw.ssh_argv(other, "echo mine > /app/mine.txt; echo started; exec sleep 30"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert busy.stdout is not None and busy.stdout.readline() == b"started\n"
        probes = {
            "db": gw.state_dir / "gateway.db",
            "keys": gw.root / "keys",
            "dynos": gw.state_dir / "dynos",
            "other release": gw.state_dir / "releases" / other / "v1" / "secret.txt",
        }
        script = "; ".join(f"ls -d {path} >/dev/null 2>&1 && echo SEEN {i}" for i, path in
                           enumerate(probes.values()))  # fmt: skip
        result = gw.ssh(app, f"{script}; touch /usr/x 2>/dev/null || echo usr read-only")
        assert result.stdout == b"usr read-only\n", (result.stdout, list(probes))
        # No path of the host in what the dyno can read of its mounts and its processes.
        seen = gw.ssh(app, "cat /proc/self/mountinfo /proc/*/cmdline 2>/dev/null").stdout
        assert str(gw.root).encode() not in seen and b"/state" not in seen, seen
        # Nor can it reach a terminal of the gateway's: a pipe dyno has no terminal at all.
        assert gw.ssh(app, ": </dev/tty").returncode != 0
    finally:
        busy.kill()
        busy.wait()


def test_app_writes_stay_in_the_dyno_and_the_release_is_not_copied(gw: Gateway) -> None:
    app = gw.new_app({"hello.txt": "hello\n", "sub/keep.txt": "keep\n"})
    first = gw.ssh(app, "echo changed > hello.txt; echo new > sub/new.txt; rm sub/keep.txt; ls sub")
    assert first.returncode == 0, first.stderr
    assert first.stdout == b"new.txt\n"
    second = gw.ssh(app, "cat hello.txt; ls sub")
    assert second.stdout == b"hello\nkeep.txt\n"
    release = gw.state_dir / "releases" / app / "v1"
    assert (release / "hello.txt").read_text() == "hello\n"
    assert sorted(p.name for p in (release / "sub").iterdir()) == ["keep.txt"]
    # /app is an overlay of the release itself, which the app's uid owns: no copy of it.
    uid = int(gw.ssh(app, "id -u").stdout)
    assert release.stat().st_uid == uid and (release / "hello.txt").stat().st_uid == uid
    assert not (gw.state_dir / "views").exists()


def test_every_writable_place_counts_against_one_budget(own_gateway: Gateway) -> None:
    own_gateway.extra_config = "tmp_max_bytes = 8388608\n" + QUICK_IDLE
    own_gateway.write_config()
    gw = _sandboxed(own_gateway)
    gw.start()
    app = gw.new_app()
    fill = "head -c 5000000 /dev/zero > {} && echo ok || echo full"
    result = gw.ssh(app, "; ".join(fill.format(p) for p in ("/tmp/a", "/app/b", "/dev/shm/c")))
    assert result.stdout == b"ok\nfull\nfull\n", result.stdout  # 8 MB for all three
    assert gw.ssh(app, "touch /x 2>&1 || echo read-only").stdout.endswith(b"read-only\n")
    assert gw.ssh(app, "ls -A /tmp /dev/shm; ls /app").stdout == b"/dev/shm:\n\n/tmp:\nhello.txt\n"


def test_a_dyno_connects_out_but_nothing_connects_in(gw: Gateway, test_host: NetnsHost) -> None:
    app = gw.new_app()
    port, server = test_host.serve_once(b"hello from the test host\n")
    try:
        result = gw.ssh(app, f"exec 3<>/dev/tcp/{test_host.address}/{port}; head -1 <&3")
        assert result.stdout == b"hello from the test host\n", result.stderr
    finally:
        server.kill()
        server.wait()

    # No address of the host answers a dyno, though a server listens on all of them:
    # not its loopback (the gateway's own SSH port there), not the gateway's end of the
    # test host's pair, not the host's side of the dyno's own pair, nor its main address.
    with _host_listener() as (port, accepted):
        targets = " ".join(
            f"{host}:{p}"
            for host, p in (("127.0.0.1", port), ("127.0.0.1", gw.port), ("$h", port),
                            (test_host.gateway, port), (_main_address(), port))
        )  # fmt: skip
        probe = (
            "h=$(ip -4 route show default | cut -d' ' -f3); echo $h;"
            f" for t in {targets}; do"
            ' timeout 3 bash -c "exec 3<>/dev/tcp/${t%:*}/${t#*:}" 2>/dev/null'
            " && echo REACHED $t; done; echo done"
        )
        # The dyno stays up meanwhile, so that its pair (and the host's end) stays too.
        client = subprocess.Popen(gw.ssh_argv(app, probe + "; exec sleep 30"),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
        try:
            assert client.stdout is not None
            lines = [client.stdout.readline()]
            while lines[-1] not in (b"done\n", b""):
                lines.append(client.stdout.readline())
            assert lines[-1] == b"done\n" and not [x for x in lines if b"REACHED" in x], lines
            assert not accepted
            # The listener is real: from the host itself it answers on each of them.
            host_side = lines[0].decode().strip()
            for target in ("127.0.0.1", host_side, test_host.gateway, _main_address()):
                socket.create_connection((target, port), timeout=2).close()
            assert wait_until(lambda: len(accepted) == 4, 5)
        finally:
            client.kill()
            client.wait()

    # A server inside a dyno is reachable from nowhere outside it: not from the test
    # host (which routes the dynos' subnet through this host), not from this host, not
    # from another dyno.
    listener = (
        "import socket,time; s=socket.create_server(('0.0.0.0', 8000));"
        " print('listening', flush=True); time.sleep(30)"
    )
    client = subprocess.Popen(
        gw.ssh_argv(app, f'ip -4 -o addr show eth0; python3 -c "{listener}"'),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert client.stdout is not None
        address = client.stdout.readline().split()[3].decode().split("/")[0]  # this dyno's
        assert client.stdout.readline() == b"listening\n"
        subprocess.run(["ip", "-n", test_host.name, "route", "add", "10.199.0.0/16",
                        "via", test_host.gateway], check=True)  # fmt: skip
        probe = f"import socket; socket.create_connection(('{address}', 8000), timeout=2)"
        from_test_host = test_host.run(sys.executable, "-c", probe, stderr=subprocess.PIPE)
        assert from_test_host.wait(10) != 0
        with pytest.raises(OSError):
            socket.create_connection((address, 8000), timeout=2).close()
        other = gw.new_app()
        neighbour = gw.ssh(other, f"timeout 3 bash -c 'exec 3<>/dev/tcp/{address}/8000' || echo no")
        assert neighbour.stdout.endswith(b"no\n")
    finally:
        client.kill()
        client.wait()


@contextlib.contextmanager
def _host_listener() -> Iterator[tuple[int, list[str]]]:
    """A TCP server on every address of this host; yields its port and the addresses
    of the peers it accepted."""
    server = socket.create_server(("0.0.0.0", 0))
    accepted: list[str] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, peer = server.accept()
                accepted.append(peer[0])
                conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], accepted
    finally:
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        thread.join(5)


def _main_address() -> str:
    """This host's address on its default route (its address to the outside)."""
    out = subprocess.run(["ip", "-4", "route", "get", "192.0.2.1"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    return out.split(" src ")[1].split()[0]


def test_network_none_has_only_loopback(own_gateway: Gateway, test_host: NetnsHost) -> None:
    own_gateway.extra_config = 'network = "none"\n'
    own_gateway.write_config()
    gw = _sandboxed(own_gateway)
    gw.start()
    app = gw.new_app()
    result = gw.ssh(app, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
    assert result.stdout == b"lo\n"
    out = gw.ssh(app, f"timeout 3 bash -c 'exec 3<>/dev/tcp/{test_host.address}/22' || echo no")
    assert out.stdout.endswith(b"no\n")


def test_memory_over_the_limit_ends_the_dyno_with_r15(gw: Gateway) -> None:
    app = gw.new_app()
    gw.cli("apps:update", app, "--size", "tiny")
    # Twice the 64 MB of a tiny dyno, touched page by page.
    result = gw.ssh(app, "python3 -c 'x = b\"x\" * (128 << 20); print(len(x))'; echo after")
    # The dyno is killed (SIGKILL: OpenSSH's client exits 255 on an exit signal), whole:
    # the shell does not go on after python.
    assert result.returncode == 255, (result.stdout, result.stderr)
    assert b"after" not in result.stdout
    logs = gw.cli("logs", app, "-p", "run.1").stdout
    assert "heroku[run.1]: Error R15 (Memory quota vastly exceeded)" in logs, logs
    assert "heroku[run.1]: Process exited with status 137" in logs
    assert gw.ssh(app, "echo fine").stdout == b"fine\n"  # the gateway kept serving


def test_a_fork_bomb_is_contained_and_cleaned_up(gw: Gateway) -> None:
    bombed, other = gw.new_app(), gw.new_app()
    gw.cli("apps:update", bombed, "--size", "tiny")
    bomb = subprocess.Popen(
        gw.ssh_argv(bombed, "b() { b | b & }; b & echo started; exec sleep 60"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )

    def busiest() -> Path:
        groups = [g for g in _dyno_groups(gw) if g.name.startswith(bombed + ".")
                  and (g / "pids.current").exists()]  # fmt: skip
        return max(groups, key=lambda g: int((g / "pids.current").read_text()))

    try:
        assert bomb.stdout is not None and bomb.stdout.readline() == b"started\n"
        assert wait_until(lambda: int((busiest() / "pids.current").read_text()) >= 60, 10)
        group = busiest()
        assert int((group / "pids.current").read_text()) <= 64
        for _ in range(5):  # another dyno stays responsive while the bomb goes on
            started = time.monotonic()
            assert gw.ssh(other, "echo alive", timeout=20).stdout == b"alive\n"
            assert time.monotonic() - started < 5
        assert int((group / "pids.events").read_text().split()[-1]) > 0  # forks were refused
    finally:
        bomb.kill()
        bomb.wait()
    assert wait_until(lambda: _nothing_left(gw), 20), _dyno_groups(gw)
    assert not _processes_of(gw)


def _processes_of(gw: Gateway) -> list[str]:
    """Host processes that belong to the gateway's dynos: in its cgroups, or children of
    the manager other than the front. The manager and the front are not counted."""
    assert gw.process is not None
    parent = _cgroup_parents(gw)[0].name
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cgroup = (entry / "cgroup").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            status = (entry / "status").read_text()
        except OSError:
            continue
        ppid = int(re.search(r"PPid:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
        if parent in cgroup or (ppid == gw.process.pid and "_front" not in cmdline):
            found.append(f"{entry.name}: {cmdline}")
    return found


def test_200_dynos_leave_nothing_behind(gw: Gateway) -> None:
    app = gw.new_app()
    mounts_before = set(Path("/proc/self/mountinfo").read_text().splitlines())

    def run(_: int) -> tuple[int, bytes]:
        result = gw.ssh(app, "true", timeout=60)
        return result.returncode, result.stderr

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(run, range(200)))
    assert [status for status, _ in statuses] == [0] * 200, {e for s, e in statuses if s}
    # The prepared sandboxes go once unused for prepared_idle (3 s here): then nothing.
    assert wait_until(lambda: _nothing_left(gw), 20), _dyno_groups(gw)
    assert wait_until(lambda: not _processes_of(gw), 5), _processes_of(gw)
    # Dyno mounts only ever exist in the dyno's own namespace: none appeared on the host
    # (other tests on this host may mount and link things of their own meanwhile).
    new_mounts = set(Path("/proc/self/mountinfo").read_text().splitlines()) - mounts_before
    assert not [m for m in new_mounts if str(gw.root) in m or " overlay " in m], new_mounts
    # Every dyno's veth pair went with its namespace (the kernel removes it in the
    # background).
    assert wait_until(lambda: not _links(gw), 10), _links(gw)


def test_no_two_dynos_ever_share_a_sandbox(gw: Gateway) -> None:
    """Sandboxes are made ahead and handed out from a pool: each to one dyno only.
    Dynos at once have namespaces of their own; a dyno after another finds nothing the
    other left, whether its sandbox came from the pool or was made for it."""
    app = gw.new_app()
    identity = "readlink /proc/self/ns/mnt /proc/self/ns/net /proc/self/ns/pid /proc/self/ns/ipc"
    clients = [
        subprocess.Popen(gw.ssh_argv(app, f"{identity}; echo started; exec sleep 30"),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(8)
    ]  # fmt: skip
    try:
        seen = []
        for client in clients:
            assert client.stdout is not None
            lines = [client.stdout.readline().strip() for _ in range(5)]
            assert lines[-1] == b"started", lines
            seen.append(lines[:4])
        for kind in range(4):  # mnt, net, pid, ipc: eight different namespaces of each
            assert len({namespaces[kind] for namespaces in seen}) == 8, seen
    finally:
        for client in clients:
            client.kill()
            client.wait()
    leave = "echo x > /tmp/left; echo x > /dev/shm/left; echo x > /app/left; echo left"
    assert gw.ssh(app, leave).stdout == b"left\n"
    for _ in range(6):  # the pool's sandboxes, then ones it made meanwhile
        look = gw.ssh(app, "ls -A /tmp /dev/shm; ls /app; ps -e -o comm=")
        assert look.stdout == b"/dev/shm:\n\n/tmp:\nhello.txt\ndyno-init\nps\n", look


def test_a_replaced_release_is_never_run(gw: Gateway) -> None:
    """The pool holds sandboxes of the release in use; the moment a new release exists,
    sessions run it, and the old release's sandboxes go."""
    app = gw.new_app({"version.txt": "1\n"})
    assert gw.ssh(app, "cat version.txt").stdout == b"1\n"  # the pool now holds v1's
    assert wait_until(lambda: len(_app_groups(gw, app)) == 2, 10), _app_groups(gw, app)
    for version in (2, 3):
        slug = make_slug(gw.root / f"{app}-v{version}.tgz", {"version.txt": f"{version}\n"})
        gw.cli("releases:create", app, str(slug))
        for _ in range(3):
            assert gw.ssh(app, "cat version.txt").stdout == f"{version}\n".encode()
    # Only the latest release's sandboxes are left waiting (`prepared` of them).
    assert wait_until(lambda: _releases_waiting(gw, app) == ["3\n", "3\n"], 10), _releases_waiting(
        gw, app
    )


def test_prepared_sandboxes_are_bounded_and_go_when_unused(own_gateway: Gateway) -> None:
    """However many apps a host serves, it holds at most `prepared_max` sandboxes made
    ahead, and none once they have been unused for `prepared_idle`."""
    own_gateway.extra_config = "prepared = 2\nprepared_max = 3\n" + QUICK_IDLE
    own_gateway.write_config()
    gw = _sandboxed(own_gateway)
    gw.start()
    apps = [gw.new_app() for _ in range(4)]
    most = 0
    for app in apps * 2:
        assert gw.ssh(app, "echo ok").stdout == b"ok\n"
        # Dirs of dynos that ended go at once; those left are prepared ones.
        assert wait_until(lambda: len(_dyno_dirs(gw)) <= 3, 5), _dyno_dirs(gw)
        most = max(most, len(_dyno_dirs(gw)))
    assert most == 3  # the pool was used, up to its bound
    assert wait_until(lambda: not _dyno_dirs(gw), 10), _dyno_dirs(gw)  # prepared_idle: 3 s
    assert wait_until(lambda: not _dyno_groups(gw), 5), _dyno_groups(gw)


def _dyno_dirs(gw: Gateway) -> list[str]:
    return [p.name for p in (gw.state_dir / "dynos").iterdir()]


def _app_groups(gw: Gateway, app: str) -> list[Path]:
    """The memory cgroups of `app`'s dynos, prepared ones included."""
    return [p for p in _cgroup_parents(gw)[0].glob(app + ".*") if p.is_dir()]


def _releases_waiting(gw: Gateway, app: str) -> list[str]:
    """version.txt as each of `app`'s sandboxes sees it in its /app (read through its
    init's root), for those whose init still runs."""
    seen = []
    for group in _app_groups(gw, app):
        with contextlib.suppress(OSError, IndexError):
            pid = (group / "cgroup.procs").read_text().split()[0]
            seen.append(Path(f"/proc/{pid}/root/app/version.txt").read_text())
    return sorted(seen)


def _links(gw: Gateway) -> list[str]:
    """The host ends of this gateway's dynos' veth pairs."""
    prefix = veth.name_prefix(gw.state_dir) + "-"
    return [name for name in os.listdir("/sys/class/net") if name.startswith(prefix)]


def _serve(gw: Gateway) -> subprocess.CompletedProcess[str]:
    """Run `gateway serve` and expect it to exit by itself (it refuses to start)."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(gw.config_path), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_sandbox_that_cannot_work_refuses_to_start(own_gateway: Gateway) -> None:
    # A stack without /usr: the init builds the sandbox, but no shell could run in it.
    own_gateway.extra_config = 'stack = ["/nonexistent-stack"]\n'
    own_gateway.write_config()
    gw = _sandboxed(own_gateway)
    result = _serve(gw)
    assert result.returncode != 0
    assert 'dynos.sandbox = "namespaces" cannot work here' in result.stderr, result.stderr
    assert "a trial dyno failed" in result.stderr
    assert not list((gw.state_dir / "dynos").iterdir())
    # bwrap, asked for by name as root, says what to use instead.
    text = gw.config_path.read_text()
    gw.config_path.write_text(text.replace('sandbox = "namespaces"', 'sandbox = "bwrap"'))
    refused = _serve(gw)
    assert refused.returncode != 0 and "use the namespaces sandbox" in refused.stderr


def test_auto_falls_back_to_the_process_sandbox_and_says_so(own_gateway: Gateway) -> None:
    own_gateway.extra_config = 'stack = ["/nonexistent-stack"]\n'
    own_gateway.write_config()
    text = own_gateway.config_path.read_text()
    own_gateway.config_path.write_text(text.replace('sandbox = "process"', 'sandbox = "auto"'))
    own_gateway.start()
    log = "\n".join(own_gateway.log)
    assert "the namespaces sandbox cannot work here" in log
    assert "bubblewrap cannot work here, falling back" in log
    assert "sandbox in force: process" in log
    app = own_gateway.new_app()
    assert own_gateway.ssh(app, "echo $DYNO").stdout == b"run.1\n"


def test_a_terminal_shell_has_job_control(
    gw: Gateway, tmp_path: Path, terminal: list[Terminal]
) -> None:
    app = gw.new_app()
    term = Terminal(tmp_path, gw.ssh_argv(app, tty=True))
    terminal.append(term)
    term.wait_for(r"attached to terminal\.\.\. up, run\.1")
    term.line("hostname; tty; sleep 100 &")
    term.wait_for(r"run\.1")
    term.line("jobs")
    term.wait_for(r"\[1\]\+\s+Running\s+sleep 100 &")
    term.line("fg")
    time.sleep(0.5)
    term.send("C-c")  # SIGINT to the terminal's foreground job, inside the sandbox
    term.line("jobs; echo BACK$((2+3))")
    term.wait_for("BACK5", timeout=5)
    assert "Running" not in term.screen().split("BACK")[-2].split("jobs;")[-1]
    term.line("exit 7")
    term.wait_for("EXIT=7")
    screen = term.screen()
    assert "no job control" not in screen and "cannot set terminal" not in screen, screen


@pytest.fixture
def terminal() -> Iterator[list[Terminal]]:
    opened: list[Terminal] = []
    yield opened
    for term in opened:
        term.close()


# The process sandbox's behaviour tests, run again in namespaces: same streams, same exit
# statuses, same signals, same hang-up and detach semantics.

PARITY = [
    test_exec.test_stdout_stderr_and_exit_status_are_separate,
    test_exec.test_20mb_of_random_bytes_come_back_identical,
    test_exec.test_binary_output_on_both_streams,
    test_exec.test_each_dyno_gets_a_fresh_copy_of_the_release,
    test_exec.test_environment_holds_config_vars_dyno_and_home,
    test_exec.test_files_a_dyno_makes_have_the_usual_modes,
    test_exec.test_procfile_process_type_resolves_with_its_arguments,
    test_interactive.test_signal_requests_reach_the_dyno,
    test_interactive.test_a_100kb_paste_through_the_pty_arrives_intact,
    test_interactive.test_exit_status_comes_after_the_last_output_byte,
]


@pytest.mark.parametrize("check", PARITY, ids=lambda f: f.__name__.removeprefix("test_"))
def test_parity_with_the_process_sandbox(
    gw: Gateway, tmp_path: Path, check: Callable[..., None]
) -> None:
    wants_path = "tmp_path" in inspect.signature(check).parameters
    check(gw, tmp_path) if wants_path else check(gw)


@pytest.mark.parametrize("tty", [False, True], ids=["pipes", "pty"])
def test_parity_killing_the_client_ends_the_dyno(gw: Gateway, tty: bool) -> None:
    test_interactive.test_killing_the_client_ends_the_dyno(gw, tty)


@pytest.mark.parametrize("tty", [False, True], ids=["pipes", "pty"])
def test_parity_a_process_trapping_hup_runs_on_detached(gw: Gateway, tty: bool) -> None:
    test_interactive.test_a_process_trapping_hup_runs_on_detached(gw, tty)


def test_parity_shell_on_a_terminal(gw: Gateway, tmp_path: Path, terminal: list[Terminal]) -> None:
    test_interactive.test_shell_on_a_terminal(gw, tmp_path, terminal)


def test_dyno_cleanup_survives_a_dead_manager(own_gateway: Gateway) -> None:
    own_gateway.extra_config = QUICK_IDLE
    own_gateway.write_config()
    gw = _sandboxed(own_gateway)
    gw.start()
    app = gw.new_app()
    client = subprocess.Popen(
        gw.ssh_argv(app, "trap '' HUP; echo started; exec sleep 300"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert client.stdout is not None and client.stderr is not None
    assert client.stdout.readline() == b"started\n", (client.stderr.read(), gw.log[-20:])
    assert gw.process is not None
    os.kill(gw.process.pid, 9)  # the manager dies without cleaning up
    gw.process.wait()
    gw.process = None
    client.kill()
    client.wait()
    assert _dyno_groups(gw)  # the dyno's group is still there
    # Its init saw the manager's end (its control socket closed) and ended the dyno.
    assert wait_until(lambda: not any(not _empty(g) for g in _dyno_groups(gw)), 5)
    gw.start()  # a new manager removes what the dead one left
    assert wait_until(lambda: _nothing_left(gw), 10), _dyno_groups(gw)
    assert wait_until(lambda: not _processes_of(gw), 5), _processes_of(gw)


def _empty(group: Path) -> bool:
    procs = group / "cgroup.procs"
    return not procs.exists() or not procs.read_text().strip()


def _copy_for_another_user(modules: str, into: Path) -> None:
    """Copy the packages that importing `modules` loads from this checkout and its venv
    into `into`, for a user who cannot read either (a checkout in a 0700 dir, as
    `mktemp -d` makes, or a venv under /root); the standard library stays where it is."""
    listing = subprocess.run(
        [sys.executable, "-c", f"import sys, {modules}\n"
         "for m in list(sys.modules.values()): print(getattr(m, '__file__', None) or '')"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    ours = [Path(sys.prefix).resolve(), Path(__file__).resolve().parent.parent]
    roots: set[Path] = set()
    for line in listing.stdout.splitlines():
        path = Path(line).resolve() if line else None
        for base in ours:
            if path is not None and path.is_relative_to(base):
                parts = path.relative_to(base).parts
                # site-packages/NAME... or gateway/...: the top-level package or module.
                top = parts.index("site-packages") + 1 if "site-packages" in parts else 0
                roots.add(base.joinpath(*parts[: top + 1]))
    for root in roots:
        if root.is_dir():
            shutil.copytree(root, into / root.name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(root, into / root.name)


def test_without_root_a_dyno_runs_in_a_user_namespace() -> None:
    """The manager as an ordinary user (here uid 65534): the start-up trial dyno runs
    through bwrap with a user namespace, a copy for /app and no cgroups, and outbound
    networking, which needs root, is reported as not in force."""
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    # The interpreter itself (the venv's links to it), and the gateway with its
    # dependencies copied where uid 65534 can read them.
    python = os.path.realpath(sys.executable)
    home = Path(tempfile.mkdtemp(prefix="gateway-nonroot-", dir="/tmp"))
    try:
        lib = home / "lib"
        lib.mkdir()
        _copy_for_another_user("gateway.config, gateway.manager.bwrap", lib)
        for path in [home, *home.rglob("*")]:
            os.chown(path, 65534, 65534, follow_symlinks=False)
        home.chmod(0o755)
        repo = str(lib)
        reach = subprocess.run(
            [*as_nobody, python, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
             "import gateway.manager.bwrap", repo],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert reach.returncode == 0, reach.stderr[-2000:]
        script = (
            "import sys; sys.path.insert(0, sys.argv[1])\n"
            "from gateway.config import parse\n"
            "from gateway.manager.bwrap import BwrapSandbox\n"
            "from gateway.manager.dyno_init import InitBinary\n"
            "config = parse({'state_dir': sys.argv[2], 'dynos': {'sandbox': 'bwrap'}})\n"
            "init = InitBinary.ensure(config.state_dir / 'lib')\n"
            "import functools, trio\n"
            "probe = functools.partial(BwrapSandbox.probe, config, strict=False, init=init)\n"
            "print(trio.run(probe).describe())\n"
        )
        result = subprocess.run(
            [*as_nobody, python, "-c", script, repo, str(home / "state")],
            capture_output=True, text=True, timeout=60, cwd=home,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        line = result.stdout
        assert "sandbox in force: bwrap" in line and "mapped to the gateway's user" in line
        assert "network host (outbound NAT needs root)" in line and "rlimits only" in line
        # The trial (as `gateway check` runs it) leaves no dyno dir behind.
        assert not list((home / "state" / "dynos").iterdir())
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_an_app_runs_only_the_sizes_the_operator_allows(gw: Gateway) -> None:
    app = gw.new_app()
    refused = gw.ssh(app, "run --size performance-l -- true")
    assert refused.returncode == 1
    assert b"may not use performance-l dynos (the largest it may use is standard-2x" in (
        refused.stderr
    )
    assert gw.ssh(app, "run --size standard-2x -- echo ok").stdout == b"ok\n"
    gw.cli("apps:update", app, "--max-size", "performance-l")
    assert gw.ssh(app, "run --size performance-l -- echo ok").stdout == b"ok\n"
    bad = gw.cli("apps:update", app, "--size", "performance-l", "--max-size", "standard-1x",
                 check=False)  # fmt: skip
    assert bad.returncode == 1 and "may not use performance-l" in bad.stderr


def test_all_dynos_together_leave_the_host_its_reserve(gw: Gateway) -> None:
    memory_parent, pids_parent, _ = _cgroup_parents(gw)
    meminfo = Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]
    host_mb = int(meminfo) // 1024
    cap = int((memory_parent / "memory.limit_in_bytes").read_text())
    assert cap == max(host_mb - 1024, host_mb // 2) * 1024 * 1024
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    assert int((pids_parent / "pids.max").read_text()) == max(pid_max - 1024, pid_max // 2)


def test_check_refuses_a_size_larger_than_the_host(own_gateway: Gateway) -> None:
    own_gateway.extra_config = "[sizes.huge]\nmemory = 100000000\npids = 10\ncpu = 64\n"
    own_gateway.write_config()
    result = own_gateway.cli("check", check=False)
    assert result.returncode == 1
    assert "FAIL size huge: 100000000 MB of memory, the host has" in result.stdout
    assert "64 CPUs, the host has" in result.stdout


def test_check_refuses_a_uid_range_a_host_user_holds(own_gateway: Gateway) -> None:
    # nobody (65534) is on every Debian host.
    own_gateway.extra_config = 'uid_range = "65000-66000"\n'
    own_gateway.write_config()
    result = own_gateway.cli("check", check=False)
    assert result.returncode == 1
    assert "FAIL uid_range 65000-66000: held on this host by user nobody (65534)" in (result.stdout)
