"""Nothing grows: after a few hundred dynos of every kind, the manager's and the front's
open descriptors and child processes are back at their baseline, in both sandboxes.

(The long run, 20,000 sessions with RSS, mounts, cgroups and the WAL, is bench/endurance.py.)
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import Gateway, _gateway, wait_until

# Short enough that cycled dynos are part of the mix, long enough that a dyno started
# with run:detached is still up when run:stop follows on a loaded machine.
MAX_LIFETIME = 5
PER_APP = 12  # max_per_app: one app is filled up to it; the others stay well below
KINDS = 10  # the kinds of session in `one` below
SESSIONS = 300


@pytest.fixture(scope="module", params=["process", "namespaces"])
def gw(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    # Prepared sandboxes (namespaces) kept 3 s unused, so that the pool's settling can be
    # waited for.
    config = f"max_lifetime = {MAX_LIFETIME}\nprepared_idle = 3\nmax_per_app = {PER_APP}\n"
    gateway = _gateway(tmp_path_factory.mktemp(request.param), extra_config=config)
    text = gateway.config_path.read_text()
    gateway.config_path.write_text(
        text.replace('sandbox = "process"', f'sandbox = "{request.param}"')
    )
    gateway.start()
    yield gateway
    gateway.stop()


def children_of(pid: int) -> list[int]:
    """Child processes, whichever of the process's threads forked them."""
    return [
        int(child)
        for task in os.listdir(f"/proc/{pid}/task")
        for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split()
    ]


def front_pid(gw: Gateway) -> int:
    assert gw.process is not None
    children = children_of(gw.process.pid)
    fronts = [pid for pid in children if b"_front" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(fronts) == 1, children
    return fronts[0]


def usage(pid: int) -> tuple[int, list[str]]:
    """Open descriptors, and the names of child processes (all threads' children)."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    children = []
    for child in children_of(pid):
        with contextlib.suppress(OSError):
            children.append(Path(f"/proc/{child}/comm").read_text().strip())
    return fds, sorted(children)


def snapshot(gw: Gateway) -> dict[str, tuple[int, list[str]]]:
    assert gw.process is not None
    return {"manager": usage(gw.process.pid), "front": usage(front_pid(gw))}


def no_dynos_left(gw: Gateway, apps: list[str]) -> bool:
    dynos = gw.state_dir / "dynos"
    return not any(dynos.glob("*")) and all(
        json.loads(gw.cli("ps", app, "--json").stdout) == [] for app in apps
    )


class Clients:
    """OpenSSH clients for the test's apps: through one ControlMaster connection per
    app, or on a fresh connection each."""

    def __init__(self, gw: Gateway, control_dir: Path) -> None:
        self.base = gw.ssh_argv("x")[:-1]  # the ssh options, without the destination
        self.control_dir = control_dir

    def shared(self, app: str) -> list[str]:
        return [*self.base, "-o", "ControlMaster=auto", "-o",
                f"ControlPath={self.control_dir / app}", "-o", "ControlPersist=60"]  # fmt: skip

    def run(
        self, app: str, *command: str, tty: bool = False, fresh: bool = False, input: bytes = b""
    ) -> subprocess.CompletedProcess[bytes]:
        options = self.base if fresh else self.shared(app)
        argv = [*options, *(["-tt"] if tty else []), f"{app}@127.0.0.1", *command]
        return subprocess.run(argv, input=input, capture_output=True, timeout=60)

    def killed_mid_session(self, app: str, tty: bool) -> None:
        """A client killed (SIGKILL) while its dyno runs: no goodbye of any kind."""
        argv = [*self.base, *(["-tt"] if tty else []), f"{app}@127.0.0.1", "echo up; sleep 100"]
        client = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL)  # fmt: skip
        assert client.stdout is not None
        try:
            assert client.stdout.readline().strip() == b"up"  # the dyno runs
        finally:
            client.kill()
            client.wait()
            client.stdout.close()
            assert client.stdin is not None
            client.stdin.close()

    def close(self, apps: list[str]) -> None:
        for app in apps:
            subprocess.run([*self.shared(app), "-O", "exit", f"{app}@127.0.0.1"],
                           capture_output=True)  # fmt: skip


def dyno_name(started: subprocess.CompletedProcess[bytes]) -> str:
    """run.N from run:detached's `Running `CMD` detached... up, run.N (Standard-1X)`."""
    assert started.returncode == 0, started.stderr
    return started.stdout.split(b"up, ", 1)[1].split()[0].decode()


def session(clients: Clients, apps: list[str], capped: str, bare: str) -> Callable[[int], None]:
    """Session number i: one of KINDS kinds, for one of `apps` in turn."""

    def one(i: int) -> None:
        app, kind = apps[i % len(apps)], (i // len(apps)) % KINDS
        if kind == 0:  # exec, pipes
            assert clients.run(app, "echo", str(i)).stdout == f"{i}\n".encode()
        elif kind == 1:  # exec, PTY, an exit status
            assert clients.run(app, f"echo {i}; exit 3", tty=True).returncode == 3
        elif kind == 2:
            assert clients.run(app, "run:detached", f"echo {i}").returncode == 0
        elif kind == 3:
            clients.killed_mid_session(app, tty=False)
        elif kind == 4:  # run:stop
            name = dyno_name(clients.run(app, "run:detached", f"sleep 200.{i}"))
            stopped = clients.run(app, "run:stop", name)
            assert stopped.returncode == 0, stopped.stderr
        elif kind == 5:  # cycled at max_lifetime (one round in three: they pile up)
            seconds = f"300.{i}" if i // (len(apps) * KINDS) % 3 == 0 else "0.5"
            assert clients.run(app, "run:detached", f"sleep {seconds}").returncode == 0
        elif kind == 6:  # refusals: unknown size, no release, a size the app may not use
            assert b"unknown dyno size" in clients.run(app, "run --size huge -- true").stderr
            assert clients.run(bare, "true").returncode == 1
            over = clients.run(capped, "run --size standard-2x -- true")
            assert b"may not use standard-2x" in over.stderr, over.stderr
        elif kind == 7:  # a PTY session leaving a nohup job behind, which ends later
            assert (
                clients.run(app, "nohup sleep 1 >/dev/null 2>&1 & echo", tty=True).returncode == 0
            )
        elif kind == 8:
            clients.killed_mid_session(app, tty=True)
        else:  # a fresh connection, 64 KB up and back
            data = os.urandom(65536)
            assert clients.run(app, "cat", fresh=True, input=data).stdout == data

    return one


def fill_up(clients: Clients, app: str) -> list[bytes]:
    """Ask for twice the per-app limit of detached dynos of `app` at once, each on a
    connection of its own; the refusals (the limit lets PER_APP run at a time)."""

    def start(_: int) -> subprocess.CompletedProcess[bytes]:
        return clients.run(app, "run:detached", "sleep 400", fresh=True)

    with ThreadPoolExecutor(2 * PER_APP) as pool:
        return [r.stderr for r in pool.map(start, range(2 * PER_APP)) if r.returncode != 0]


def test_descriptors_and_children_return_to_baseline(gw: Gateway, tmp_path: Path) -> None:
    apps = [gw.new_app() for _ in range(3)]
    capped = gw.new_app()  # filled up to max_per_app; may use standard-1x at most
    gw.cli("apps:update", capped, "--max-size", "standard-1x")
    bare = gw.new_app(release=False)  # refused: no release yet
    everyone = [*apps, capped, bare]
    clients = Clients(gw, tmp_path)

    # Warm up (the first dyno of a release makes its view; the master connections open).
    for app in [*apps, capped]:
        assert clients.run(app, "true").returncode == 0
    assert clients.run(bare, "true").returncode == 1
    clients.close(everyone)
    assert wait_until(lambda: no_dynos_left(gw, everyone), 15)
    before = snapshot(gw)

    refusals = fill_up(clients, capped)
    assert refusals and all(b"dynos.max_per_app" in refused for refused in refusals), refusals
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(session(clients, apps, capped, bare), range(SESSIONS)))
    clients.close(everyone)
    assert wait_until(lambda: no_dynos_left(gw, everyone), 40), [
        gw.cli("ps", app).stdout for app in everyone
    ]
    assert wait_until(lambda: snapshot(gw) == before, 10), (before, snapshot(gw), details(gw))
    # Every stopped or cycled dyno (sleep) ended on its SIGTERM: none needed the SIGKILL
    # after stop_grace (a SIGTERM lost between the start and the exec would).
    for app in [*apps, capped]:
        log = gw.cli("logs", app, "-n", "1500").stdout
        assert "Error R12" not in log, [line for line in log.splitlines() if "R12" in line]


def details(gw: Gateway) -> list[str]:
    """What an operator would look at: the manager's children and descriptors, and what
    the gateway logged as going wrong."""
    assert gw.process is not None
    found = []
    for pid in children_of(gw.process.pid):
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
            state = " ".join(line for line in status if line.startswith(("State", "NSpid")))
            found.append(f"{pid} {Path(f'/proc/{pid}/cmdline').read_bytes()!r} {state}")
    fd_dir = Path(f"/proc/{gw.process.pid}/fd")
    with contextlib.suppress(OSError):
        found += sorted(os.readlink(fd) for fd in fd_dir.iterdir())
    found += [line for line in gw.log if " WARNING " in line or " ERROR " in line]
    return found
