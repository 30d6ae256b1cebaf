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
    assert "4 kept, 0 broken" in result.stdout


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
        result = subprocess.run(
            ["sh", "-c", ssh_line],
            cwd=checkout,
            capture_output=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"hello from run.1\n"
    finally:
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C, as the demo says
        assert process.wait(30) == 0, "\n".join(lines)
