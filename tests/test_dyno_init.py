"""The dyno's init on its own (dyno_init_sessions.c), driven as the manager drives it: the
real binary, real processes and sockets, no gateway. What SSH shows of it is in
tests/test_into_dyno.py; here, the limits and refusals no client reaches easily."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import trio

from gateway.ipc import received_fds
from gateway.manager.dyno_init import InitBinary, InitControl
from gateway.manager.spawn import Child, spawn

ENV = {"PATH": "/usr/bin:/bin"}


def _start(tmp_path: Path) -> tuple[Child, InitControl]:
    """An init in exec mode (the process sandbox's) running `sleep 60`."""
    binary = InitBinary.ensure(tmp_path / "lib")
    control = InitControl.open()
    process = spawn(
        [str(binary.path), *control.init_args(ctty=False), "--", "sleep", "60"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=ENV, cwd=tmp_path, pass_fds=control.child_fds,
    )  # fmt: skip
    control.close_child_ends()
    return process, control


def _enter(control: InitControl, argv: list[str]) -> socket.socket:
    """A process entered with /dev/null for its stdio; the session socket, ours."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    null = os.open(os.devnull, os.O_RDWR)
    try:
        control.enter(False, argv, ENV, [null, null, null, theirs.fileno()])
    finally:
        os.close(null)
        theirs.close()
    ours.settimeout(10)
    return ours


def test_entered_processes_up_to_the_limit_each_reporting_its_end(tmp_path: Path) -> None:
    async def main() -> None:
        process, control = _start(tmp_path)
        try:
            sessions = [_enter(control, ["sleep", "60"]) for _ in range(64)]
            answers = [s.recv(100) for s in sessions]
            assert all(a.startswith(b"pid ") for a in answers), answers
            over = _enter(control, ["sleep", "60"])
            assert over.recv(100) == b"error this dyno already has 64 sessions, the most it may"
            assert over.recv(100) == b""  # and closed
            # A signal for one session's group; its end comes back with its status.
            sessions[0].send(f"s{signal.SIGTERM.value}".encode())
            assert sessions[0].recv(100) == f"exit {signal.SIGTERM.value}".encode()
            # A hang-up (our end closed): SIGHUP ends it, and the slot is free again.
            sessions[1].close()
            with trio.fail_after(10):
                while True:  # until the init has reaped the one hung up
                    replacement = _enter(control, ["sh", "-c", "exit 7"])
                    if replacement.recv(100).startswith(b"pid "):
                        break
                    await trio.sleep(0.05)
            assert replacement.recv(100) == b"exit 1792"  # a wait status: 7 << 8
            # The dyno's end (SIGKILL to all) ends every entered process, each told so.
            control.send(b"k")
            with trio.fail_after(10):
                await process.wait()
            for s in sessions[2:]:
                assert s.recv(100) == f"exit {signal.SIGKILL.value}".encode()
        finally:
            control.close()
            if process.returncode is None:
                process.kill()
                await process.wait()

    trio.run(main)


def test_connections_go_only_to_the_loopback(tmp_path: Path) -> None:
    def connect(address: str, port: int) -> tuple[bytes, list[int]]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with ours:
            control.connect(address, port, theirs.fileno())
            theirs.close()
            ours.settimeout(10)
            data, anc, _, _ = ours.recvmsg(100, socket.CMSG_SPACE(4))
            return data, received_fds(anc)

    async def main() -> None:
        nonlocal control
        process, control = _start(tmp_path)
        try:
            with socket.create_server(("127.0.0.1", 0)) as server:
                data, fds = connect("127.0.0.1", server.getsockname()[1])
                assert data == b"ok" and len(fds) == 1
                accepted, _ = server.accept()
                with socket.socket(fileno=fds[0]) as sock, accepted:
                    sock.setblocking(True)
                    sock.sendall(b"through")
                    assert accepted.recv(100) == b"through"
            for address in ("10.0.0.1", "0.0.0.0", "::", "localhost", "not an address"):
                assert connect(address, 80) == (b"error only a loopback address and a port", [])
            assert connect("127.0.0.1", 0)[0].startswith(b"error only")
        finally:
            control.close()
            with trio.fail_after(10):
                await process.wait()

    control: InitControl
    trio.run(main)
