"""Nothing grows: after a few hundred dynos of every kind, the manager's and the front's
open descriptors and child processes are back at their baseline, in both sandboxes.

(The long run, 20,000 sessions with RSS, mounts, cgroups and the WAL, is bench/endurance.py.)
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import Gateway, _gateway, wait_until


@pytest.fixture(scope="module", params=["process", "namespaces"])
def gw(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    # A short max_lifetime, so that cycled dynos are part of the mix; prepared sandboxes
    # (namespaces) kept 3 s unused, so that the pool's settling can be waited for.
    config = "max_lifetime = 3\nprepared_idle = 3\n"
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


def test_descriptors_and_children_return_to_baseline(gw: Gateway, tmp_path: Path) -> None:
    app = gw.new_app()
    bare = gw.new_app(release=False)  # refused: no release yet
    control = tmp_path / "cm"
    base = gw.ssh_argv(app)[:-1]  # the ssh options, without the destination
    shared = [*base, "-o", "ControlMaster=auto", "-o", f"ControlPath={control}",
              "-o", "ControlPersist=60"]  # fmt: skip

    def ssh(*command: str, tty: bool = False, user: str = app, timeout: float = 60) -> int:
        options = shared if user == app else base  # one master connection: one user
        argv = [*options, *(["-tt"] if tty else []), f"{user}@127.0.0.1", *command]
        return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=timeout).returncode  # fmt: skip

    # Warm up (the first dyno of a release makes its view; the master connection opens).
    assert ssh("true") == 0
    subprocess.run([*shared, "-O", "exit", f"{app}@127.0.0.1"], capture_output=True)
    assert wait_until(lambda: no_dynos_left(gw, [app]), 15)
    before = snapshot(gw)

    def one(i: int) -> None:
        kind = i % 8
        if kind == 0:
            assert ssh("echo", str(i)) == 0  # exec, pipes
        elif kind == 1:
            assert ssh(f"echo {i}; exit 3", tty=True) == 3  # exec, PTY
        elif kind == 2:
            assert ssh("run:detached", f"echo {i}") == 0
        elif kind == 3:  # a client killed while its dyno runs
            client = subprocess.Popen(
                [*base, f"{app}@127.0.0.1", f"sleep 100.{i}"], stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            assert wait_until(lambda: _running(f"sleep 100.{i}"), 10)
            client.kill()
            client.wait()
        elif kind == 4:  # run:stop
            assert ssh("run:detached", f"sleep 200.{i}") == 0
            assert wait_until(lambda: _running(f"sleep 200.{i}"), 10)
            listing = gw.cli("ps", app).stdout
            name = next(line.split()[0] for line in listing.splitlines() if f"200.{i}" in line)
            assert ssh("run:stop", name) == 0
        elif kind == 5:  # cycled at max_lifetime
            assert ssh("run:detached", f"sleep 300.{i}") == 0
        elif kind == 6:  # refusals: unknown size, no release
            assert ssh("run", "--size", "huge", "--", "true") != 0
            assert ssh("true", user=bare) != 0
        else:  # a client leaving a PTY session with a nohup job behind: stopped later
            assert ssh("nohup sleep 1 >/dev/null 2>&1 & echo", tty=True) == 0

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(240)))
    subprocess.run([*shared, "-O", "exit", f"{app}@127.0.0.1"], capture_output=True)
    assert wait_until(lambda: no_dynos_left(gw, [app, bare]), 40), gw.cli("ps", app).stdout
    assert wait_until(lambda: snapshot(gw) == before, 10), (before, snapshot(gw), details(gw))


def details(gw: Gateway) -> list[str]:
    """What an operator would look at: the manager's children and descriptors."""
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
    return found


def _running(marker: str) -> bool:
    out = subprocess.run(["pgrep", "-f", f"^{marker}"], capture_output=True, text=True).stdout
    return bool(out.strip())
