"""The bubblewrap sandbox (`sandbox = "bwrap"`): isolation, limits, networking, cleanup.

Everything here runs real bwrap, real cgroups and the OpenSSH client against a real
gateway; nothing is skipped for want of bwrap (./dev installs bubblewrap and slirp4netns).
The pure pieces (argv, cgroup file parsing) are tested first, without processes.
"""

from __future__ import annotations

import inspect
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
from gateway.manager import limits
from gateway.manager.sandbox import DynoSpec
from tests import test_exec, test_interactive
from tests.conftest import Gateway, _gateway, wait_until
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
    entries = [bw.StackEntry("/usr"), bw.StackEntry("/bin", "usr/bin")]
    assert bw.stack_args(entries) == ["--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin"]


def test_gateway_paths_inside_the_stack_are_covered() -> None:
    entries = [bw.StackEntry("/etc"), bw.StackEntry("/usr"), bw.StackEntry("/lib", "usr/lib")]
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
    layout = bw.Layout(app="/tmp/app", tmp="/tmp/tmp", tmp_bytes=1 << 20)
    args = bw.bwrap_args(
        hostname="run.7",
        stack=[bw.StackEntry("/usr")],
        hidden=["--tmpfs", "/usr/gw"],
        layout=layout,
        network="outbound",
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
        "--bind /tmp/tmp /tmp",
        "--bind /tmp/app /app --chdir /app --clearenv",
        "--setenv DATABASE_URL postgres://secret@db/x",
        "--setenv HOME /app",
        "--setenv DYNO run.7",
    ):
        assert flag in joined
    assert "--unshare-net" not in args  # outbound: the holder's netns, served by slirp4netns
    assert "--" not in args  # options only: the command goes on the command line
    none = bw.bwrap_args(
        hostname="run.7",
        stack=[],
        hidden=[],
        layout=bw.Layout("/w/app", None, 4096),
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


def test_wrapper_argv_enters_the_holder_and_drops_root_before_bwrap() -> None:
    tools = {name: f"/bin/{name}" for name in bw.TOOLS + bw.ROOT_TOOLS}
    inner = bw.inner_argv(12, ["--ctty", "--control", "13"], "/bin/bash", "echo hi")
    argv = bw.wrapper_argv(
        tools, holder_pid=42, network="outbound", procs_files=["/cg/a", "/cg/b"], inner=inner
    )
    assert argv[:4] == ["/bin/nsenter", "--target=42", "--mount", "--net"]
    shell = argv.index(bw.WRAPPER_SCRIPT)
    assert argv[shell + 1 : shell + 5] == ["dyno", "/cg/a", "/cg/b", "--"]
    chroot = argv.index("/bin/chroot")
    assert argv[chroot + 1 : chroot + 5] == [
        "--userspec=65534:65534", "--groups=65534", "--skip-chdir", "/",
    ]  # fmt: skip
    assert argv[-12:] == [
        "/bin/bwrap", "--args", "4", "--",
        "/proc/self/fd/12", "--ctty", "--control", "13", "--", "/bin/bash", "-c", "echo hi",
    ]  # fmt: skip
    plain = bw.wrapper_argv(tools, holder_pid=None, network="host", procs_files=[], inner=["x"])
    assert "/bin/nsenter" not in plain and "/bin/chroot" not in plain
    assert plain[0] == "/bin/sh"
    host_net = bw.wrapper_argv(tools, holder_pid=7, network="host", procs_files=[], inner=["x"])
    assert "--net" not in host_net[: host_net.index("/bin/sh")]


def test_bwrap_args_refuse_nul_bytes() -> None:
    assert bw.encode_args(["--setenv", "A", "b"]) == b"--setenv\0A\0b\0"
    with pytest.raises(ValueError, match="NUL"):
        bw.encode_args(["--setenv", "A", "b\0c"])


def test_overlay_layer_paths_must_not_hold_option_separators() -> None:
    assert bw.overlay_safe(Path("/var/lib/gateway"))
    assert not bw.overlay_safe(Path("/srv/a,b")) and not bw.overlay_safe(Path("/srv/a:b"))


# A real gateway with the bwrap sandbox


def _bwrap(gw: Gateway) -> Gateway:
    """Switch a test gateway's config to the bwrap sandbox."""
    text = gw.config_path.read_text()
    assert 'sandbox = "process"' in text
    gw.config_path.write_text(text.replace('sandbox = "process"', 'sandbox = "bwrap"'))
    return gw


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One bwrap gateway (network outbound) for the tests that do not reconfigure it."""
    gateway = _bwrap(_gateway(tmp_path_factory.mktemp("bwrap"), extra_config=TINY))
    gateway.start()
    yield gateway
    gateway.stop()


def _cgroup_parents(gw: Gateway) -> list[Path]:
    """The gateway's parent group dirs, from its log line at start."""
    line = next(line for line in gw.log if "sandbox in force: bwrap" in line)
    memory = Path(re.search(r"cgroup v1 under (\S+?)\)", line).group(1))  # type: ignore[union-attr]
    name = memory.name
    return [memory, Path("/sys/fs/cgroup/pids") / name, Path("/sys/fs/cgroup/cpu") / name]


def _dyno_groups(gw: Gateway) -> list[Path]:
    found = []
    for parent in _cgroup_parents(gw):
        found += [p for p in parent.glob("*") if p.is_dir()] if parent.exists() else []
    return found


def test_serve_says_which_sandbox_is_in_force(gw: Gateway) -> None:
    line = next(line for line in gw.log if "sandbox in force" in line)
    assert "bwrap" in line and "network outbound" in line and "cgroup" in line, line
    assert "weaker" not in line, line


def test_a_dyno_sees_only_itself(gw: Gateway) -> None:
    app = gw.new_app()
    result = gw.ssh(app, "ps ax -o pid=,comm=; hostname; id -u; id -G")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    processes = [line.split() for line in lines[:-3]]
    # The dyno's init is pid 1; then the shell and ps: no host process, no other dyno.
    assert [comm for _, comm in processes] == ["dyno-init", "bash", "ps"], processes
    assert processes[0][0] == "1"
    assert lines[-3:] == ["run.1", "65534", "65534"]


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
        other_dir = next((gw.state_dir / "dynos").glob(f"{other}.run.1.*"))
        probes = {
            "db": gw.state_dir / "gateway.db",
            "keys": gw.root / "keys",
            "dynos": gw.state_dir / "dynos",
            "other dyno": other_dir,
            "other release": gw.state_dir / "releases" / other / "v1" / "secret.txt",
        }
        script = "; ".join(f"ls -d {path} >/dev/null 2>&1 && echo SEEN {i}" for i, path in
                           enumerate(probes.values()))  # fmt: skip
        result = gw.ssh(app, f"{script}; touch /usr/x 2>/dev/null || echo usr read-only")
        assert result.stdout == b"usr read-only\n", (result.stdout, list(probes))
        # Nor can it reach a terminal of the gateway's: a pipe dyno has no terminal at all.
        assert gw.ssh(app, ": </dev/tty").returncode != 0
    finally:
        busy.kill()
        busy.wait()


def test_app_writes_stay_in_the_dyno(gw: Gateway) -> None:
    app = gw.new_app({"hello.txt": "hello\n", "sub/keep.txt": "keep\n"})
    first = gw.ssh(app, "echo changed > hello.txt; echo new > sub/new.txt; rm sub/keep.txt; ls sub")
    assert first.returncode == 0, first.stderr
    assert first.stdout == b"new.txt\n"
    second = gw.ssh(app, "cat hello.txt; ls sub")
    assert second.stdout == b"hello\nkeep.txt\n"
    release = gw.state_dir / "releases" / app / "v1"
    assert (release / "hello.txt").read_text() == "hello\n"
    assert sorted(p.name for p in (release / "sub").iterdir()) == ["keep.txt"]
    (view,) = (gw.state_dir / "views" / app).iterdir()
    assert (view / "hello.txt").read_text() == "hello\n" and (view / "sub/keep.txt").exists()


def test_tmp_is_private_and_capped(own_gateway: Gateway) -> None:
    own_gateway.extra_config = "tmp_max_bytes = 8388608\n"
    own_gateway.write_config()
    gw = _bwrap(own_gateway)
    gw.start()
    app = gw.new_app()
    result = gw.ssh(app, "head -c 16000000 /dev/zero > /tmp/big; echo $?; ls /tmp")
    assert result.stdout.split()[0] != b"0", result.stdout  # ENOSPC at 8 MB
    assert gw.ssh(app, "ls -A /tmp").stdout == b""  # the next dyno's /tmp is empty


def _host_address() -> str:
    """A non-loopback IPv4 address of this host (dynos reach the host only through one):
    the source address of the default route, found by connecting a UDP socket (which
    sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("203.0.113.1", 9))  # TEST-NET-3: never answered, never sent to
        except OSError as exc:
            pytest.fail(f"this host has no IPv4 route for a dyno to reach it by: {exc}")
        address = probe.getsockname()[0]
    assert not address.startswith("127."), address
    return address


def test_a_dyno_connects_out_but_nothing_connects_in(gw: Gateway) -> None:
    address = _host_address()
    with socket.create_server((address, 0)) as server:
        port = server.getsockname()[1]

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"hello from the host\n")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        app = gw.new_app()
        result = gw.ssh(app, f"exec 3<>/dev/tcp/{address}/{port}; head -1 <&3", timeout=30)
        assert result.stdout == b"hello from the host\n", result.stderr
        thread.join(5)

    # The host's loopback is closed to dynos (slirp4netns --disable-host-loopback).
    with socket.create_server(("127.0.0.1", 0)) as local:
        port = local.getsockname()[1]
        result = gw.ssh(app, f"timeout 5 bash -c 'exec 3<>/dev/tcp/10.0.2.2/{port}' || echo no")
        assert result.stdout.endswith(b"no\n")

    # A server inside a dyno is reachable from nowhere outside it.
    listener = (
        "import socket,sys,time; s=socket.create_server(('0.0.0.0', int(sys.argv[1])));"
        " print('listening', flush=True); time.sleep(30)"
    )
    inside = _free_port()
    client = subprocess.Popen(
        gw.ssh_argv(app, f'python3 -c "{listener}" {inside}'),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert client.stdout is not None and client.stdout.readline() == b"listening\n"
        for host in ("127.0.0.1", address, "10.0.2.100"):
            with pytest.raises(OSError):
                socket.create_connection((host, inside), timeout=2).close()
    finally:
        client.kill()
        client.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_network_none_has_only_loopback(own_gateway: Gateway) -> None:
    own_gateway.extra_config = 'network = "none"\n'
    own_gateway.write_config()
    gw = _bwrap(own_gateway)
    gw.start()
    app = gw.new_app()
    result = gw.ssh(app, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
    assert result.stdout == b"lo\n"
    address = _host_address()
    with socket.create_server((address, 0)) as server:
        port = server.getsockname()[1]
        out = gw.ssh(app, f"timeout 5 bash -c 'exec 3<>/dev/tcp/{address}/{port}' || echo no")
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
    assert wait_until(lambda: not _dyno_groups(gw), 5)


def test_a_fork_bomb_is_contained_and_cleaned_up(gw: Gateway) -> None:
    bombed, other = gw.new_app(), gw.new_app()
    gw.cli("apps:update", bombed, "--size", "tiny")
    bomb = subprocess.Popen(
        gw.ssh_argv(bombed, "b() { b | b & }; b & echo started; exec sleep 60"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert bomb.stdout is not None and bomb.stdout.readline() == b"started\n"
        (group,) = [g for g in _dyno_groups(gw) if g.name.startswith(bombed + ".")
                    and "pids" in str(g)]  # fmt: skip
        assert wait_until(lambda: int((group / "pids.current").read_text()) >= 60, 10)
        assert int((group / "pids.current").read_text()) <= 64
        for _ in range(5):  # another dyno stays responsive while the bomb goes on
            started = time.monotonic()
            assert gw.ssh(other, "echo alive", timeout=20).stdout == b"alive\n"
            assert time.monotonic() - started < 5
        assert int((group / "pids.events").read_text().split()[-1]) > 0  # forks were refused
    finally:
        bomb.kill()
        bomb.wait()
    assert wait_until(lambda: not _dyno_groups(gw), 15), _dyno_groups(gw)
    assert wait_until(lambda: not list((gw.state_dir / "dynos").iterdir()), 5)
    assert not _processes_of(gw)


def _processes_of(gw: Gateway) -> list[str]:
    """Host processes that belong to the gateway's dynos: in its cgroups, or holders and
    slirp4netns it started. The manager and the front are not counted."""
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
    mounts_before = Path("/proc/self/mountinfo").read_text().count("\n")

    def run(_: int) -> tuple[int, bytes]:
        result = gw.ssh(app, "true", timeout=60)
        return result.returncode, result.stderr

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(run, range(200)))
    elapsed = time.monotonic() - started
    assert [status for status, _ in statuses] == [0] * 200, {e for s, e in statuses if s}
    assert wait_until(lambda: not list((gw.state_dir / "dynos").iterdir()), 10)
    assert not _dyno_groups(gw)
    assert not _processes_of(gw)
    mountinfo = Path("/proc/self/mountinfo").read_text()
    assert str(gw.state_dir) not in mountinfo
    assert mountinfo.count("\n") == mounts_before
    assert elapsed < 60, f"200 dynos took {elapsed:.0f} s"


def _serve(gw: Gateway) -> subprocess.CompletedProcess[str]:
    """Run `gateway serve` and expect it to exit by itself (it refuses to start)."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(gw.config_path), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_bwrap_that_cannot_work_refuses_to_start(own_gateway: Gateway) -> None:
    # A stack without /usr: bwrap itself runs, but no dyno could (no env, no shell).
    own_gateway.extra_config = 'stack = ["/nonexistent-stack"]\n'
    own_gateway.write_config()
    gw = _bwrap(own_gateway)
    result = _serve(gw)
    assert result.returncode != 0
    assert 'dynos.sandbox = "bwrap" cannot work here' in result.stderr, result.stderr
    assert "bwrap: execvp" in result.stderr  # the trial dyno's own error
    assert not list((gw.state_dir / "dynos").iterdir())


def test_auto_falls_back_to_the_process_sandbox_and_says_so(own_gateway: Gateway) -> None:
    own_gateway.extra_config = 'stack = ["/nonexistent-stack"]\n'
    own_gateway.write_config()
    text = own_gateway.config_path.read_text()
    own_gateway.config_path.write_text(text.replace('sandbox = "process"', 'sandbox = "auto"'))
    own_gateway.start()
    log = "\n".join(own_gateway.log)
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
    term.line("hostname; sleep 100 &")
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


# The process sandbox's behaviour tests, run again with bwrap: same streams, same exit
# statuses, same signals, same hang-up and detach semantics.

PARITY = [
    test_exec.test_stdout_stderr_and_exit_status_are_separate,
    test_exec.test_20mb_of_random_bytes_come_back_identical,
    test_exec.test_binary_output_on_both_streams,
    test_exec.test_each_dyno_gets_a_fresh_copy_of_the_release,
    test_exec.test_environment_holds_config_vars_dyno_and_home,
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
    gw = _bwrap(own_gateway)
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
    assert _dyno_groups(gw)  # the dyno's group, with its processes, is still there
    gw.start()  # a new manager removes what the dead one left
    assert not _dyno_groups(gw)
    assert not list((gw.state_dir / "dynos").iterdir())
    assert wait_until(lambda: not _processes_of(gw), 5), _processes_of(gw)


def test_without_root_a_dyno_runs_in_a_user_namespace() -> None:
    """The manager as an ordinary user (here uid 65534): the start-up trial dyno runs
    through bwrap with a user namespace, a copy for /app and no cgroups, and outbound
    networking, which needs root, is reported as not in force."""
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    repo = str(Path(__file__).parent.parent)
    reach = subprocess.run(
        [*as_nobody, sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
         "import gateway.manager.bwrap", repo],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    if reach.returncode != 0:
        pytest.skip(f"uid 65534 cannot run this checkout's Python here: {reach.stderr[-200:]}")
    home = Path(tempfile.mkdtemp(prefix="gateway-nonroot-", dir="/tmp"))
    try:
        os.chown(home, 65534, 65534)
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
            [*as_nobody, sys.executable, "-c", script, repo, str(home / "state")],
            capture_output=True, text=True, timeout=60, cwd=home,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        line = result.stdout
        assert "sandbox in force: bwrap" in line and "mapped to the gateway's user" in line
        assert "network host (outbound NAT unavailable" in line and "rlimits only" in line
    finally:
        shutil.rmtree(home, ignore_errors=True)
