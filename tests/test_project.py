"""The project's own promises: import rules, and the README's quick start run as written."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import REPO


def test_import_rules_hold() -> None:
    """DESIGN.md's rules: core is pure, the manager never imports asyncssh, the front
    never imports trio (contracts in pyproject.toml)."""
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\b(\d+) kept, 0 broken", result.stdout), result.stdout


def test_no_import_circle_and_no_module_over_500_lines() -> None:
    """Rooms with one job each: no two modules of gateway/ import each other, however
    indirectly (runtime and type-checking imports alike), and none grows past 500 lines."""
    import grimp

    graph = grimp.build_graph("gateway")
    modules = sorted(graph.modules)
    circles = []
    for module in modules:
        for imported in graph.find_modules_directly_imported_by(module):
            if imported != module and graph.chain_exists(imported, module):
                circles.append(graph.find_shortest_chain(imported, module))
    assert not circles, f"import circles: {circles[:3]}"
    sizes = {
        path.relative_to(REPO): len(path.read_text().splitlines())
        for path in (REPO / "gateway").rglob("*.py")
    }
    assert not {path: n for path, n in sizes.items() if n > 500}


def quick_start() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```sh\n(.*?)```", section, re.S)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_quick_start_is_two_commands_and_ci_runs_the_second() -> None:
    demo, test = quick_start()
    assert demo == "./dev demo"
    ci = (REPO / ".ci" / "run").read_text()
    assert f"exec {test} " in ci or ci.rstrip().endswith(f"exec {test}")


def _copy_checkout(dest: Path) -> None:
    """The files a fresh clone would have (tracked and not ignored), mtimes kept."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        source = REPO / os.fsdecode(name)
        if source.is_file():
            target = dest / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def _port_taken(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


@pytest.mark.skipif(_port_taken(2222), reason="port 2222, the demo's default, is taken here")
def test_readme_demo_command_prints_an_ssh_line_that_works(tmp_path: Path) -> None:
    demo, _ = quick_start()
    stamp = Path(sys.prefix) / ".installed"
    # ./dev reuses this venv only if it is installed and current; otherwise it would
    # reinstall it from the throw-away copy.
    assert stamp.exists() and stamp.stat().st_mtime >= (REPO / "pyproject.toml").stat().st_mtime, (
        "run the suite through ./dev test, which installs the venv it runs in"
    )
    checkout = tmp_path / "checkout"
    _copy_checkout(checkout)
    env = dict(os.environ, GATEWAY_VENV=str(Path(sys.prefix)))
    env.pop("GATEWAY_CONFIG", None)
    env.pop("GATEWAY_HOME", None)
    process = subprocess.Popen(
        shlex.split(demo),
        cwd=checkout,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for raw in process.stderr:
            lines.append(raw.decode(errors="replace").rstrip())
            if "Ctrl-C here stops the gateway" in lines[-1]:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(120), "\n".join(lines)
        ssh_line = next(line.strip() for line in lines if line.strip().startswith("ssh "))
        assert f"-i {checkout}/keys/demo_client_ed25519 " in ssh_line  # this copy's own keys
        elsewhere = tmp_path / "elsewhere"  # the printed line works from any directory
        elsewhere.mkdir()
        result = subprocess.run(
            ["sh", "-c", ssh_line],
            cwd=elsewhere,
            capture_output=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"hello from run.1\n"
        assert (checkout / "state" / "gateway.db").exists()
    finally:
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C, as the demo says
        assert process.wait(30) == 0, "\n".join(lines)


def using_it() -> tuple[list[str], list[str]]:
    """The README's "Using it" blocks: the set-up lines, and the client lines."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Using it", 1)[1].split("\n## ", 1)[0]
    setup, clients = re.findall(r"```sh\n(.*?)```", section, re.S)
    return (
        [line for line in setup.splitlines() if line.strip()],
        [line for line in clients.splitlines() if line.strip()],
    )


DEFAULT_PORTS = (2222, 5000, 5001, 9464)


@pytest.mark.skipif(
    any(_port_taken(port) for port in DEFAULT_PORTS),
    reason=f"one of the default ports {DEFAULT_PORTS} is taken here",
)
def test_readme_using_it_runs_as_written(tmp_path: Path) -> None:
    """Every line of "Using it", verbatim, in a fresh copy of the checkout, for a user
    whose home is a new directory. OpenSSH's client finds its files through the
    password database, not $HOME, so an `ssh` on PATH passes the new home's key and
    known_hosts on: the stand-in for that user's own ~/.ssh."""
    setup, clients = using_it()
    checkout = tmp_path / "checkout"
    _copy_checkout(checkout)
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    shim = tmp_path / "bin"
    shim.mkdir()
    real_ssh = shutil.which("ssh")
    (shim / "ssh").write_text(
        "#!/bin/sh\n"
        f'exec {real_ssh} -F /dev/null -i "$HOME/.ssh/id_ed25519" -o IdentitiesOnly=yes '
        '-o UserKnownHostsFile="$HOME/.ssh/known_hosts" -o StrictHostKeyChecking=accept-new '
        '-o BatchMode=yes "$@"\n'
    )
    (shim / "ssh").chmod(0o755)
    env = dict(os.environ, GATEWAY_VENV=str(Path(sys.prefix)), HOME=str(home))
    # As on a fresh login: the venv is not on PATH, so a bare `gateway` would not run.
    venv_bin = str(Path(sys.prefix) / "bin")
    path = [entry for entry in env["PATH"].split(":") if entry.rstrip("/") != venv_bin]
    env["PATH"] = ":".join([str(shim), *path])
    for name in ("GATEWAY_CONFIG", "GATEWAY_HOME", "XDG_STATE_HOME"):
        env.pop(name, None)

    def sh(line: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["sh", "-c", line], cwd=checkout, env=env, capture_output=True, timeout=120,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip

    serve_line = next(line for line in setup if " serve" in line)
    for line in setup[: setup.index(serve_line)]:
        result = sh(line)
        assert result.returncode == 0, (line, result.stderr)
    server = subprocess.Popen(
        shlex.split(serve_line, comments=True), cwd=checkout, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    log: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert server.stderr is not None
        for raw in server.stderr:
            log.append(raw.decode(errors="replace").rstrip())
            if "SSH listening on" in log[-1]:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(120), "\n".join(log)
        outputs = []
        for line in clients:
            result = sh(line)
            assert result.returncode == 0, (line, result.stderr)
            outputs.append(result.stdout)
        assert outputs[0] == b"run.1\n"  # as the README's comment says
        # ./dev gateway from any other directory sees the same state.
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        apps = subprocess.run(
            [str(checkout / "dev"), "gateway", "apps"], cwd=elsewhere, env=env,
            capture_output=True, timeout=60,
        )  # fmt: skip
        assert apps.stdout == b"myapp\n", apps.stderr
        assert not any(elsewhere.iterdir())
    finally:
        os.killpg(server.pid, signal.SIGINT)
        assert server.wait(60) == 0, "\n".join(log)


def test_an_installed_package_carries_the_dyno_inits_sources(tmp_path: Path) -> None:
    # docs/operations.md installs with `pip install CHECKOUT`: the manager builds the dyno
    # init from its C sources on the host, so the wheel must hold them.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
         str(REPO), "-w", str(tmp_path)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    import zipfile

    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.name for p in (REPO / "gateway" / "manager").glob("dyno_init*.[ch]")}
    assert sources and {f"gateway/manager/{name}" for name in sources} <= names
