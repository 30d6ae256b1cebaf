"""The SSH front as the privileged side sees it: what it is handed at its start
(`FrontKit`: listening sockets, host keys, the rendezvous key, the audit trail), and,
when `gateway serve` starts it (`[front] spawn`), its process (`Front`).

The front reads no key file, binds no port and opens no database: it asks for its kit
with FrontHello on its first connection and keeps that connection open for its life.
Spawned here, it starts as whoever we are and drops to `[front] user` itself, first
thing (gateway/privileges.py), and it reaches us only through a *broker*: a socket pair
over which it passes one end of each new connection it opens (no path to find, no
permission to get wrong). Started on its own, it connects to `[front] socket`.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from gateway.config import Config
from gateway.core.protocol import FrontSetup
from gateway.keys import HOST_KEY_NAMES
from gateway.manager.listeners import Listener
from gateway.tls import SERVER_CERT, SERVER_KEY

log = logging.getLogger(__name__)
# The broker's descriptor, in the front's environment.
BROKER_ENV = "GATEWAY_MANAGER_FD"


class FrontDied(Exception):
    pass


@dataclass
class FrontKit:
    """Everything the front is handed, read and opened while we still can."""

    listeners: list[Listener]
    host_keys: tuple[str, ...]
    tls_cert: str
    tls_key: str
    audit_path: Path

    @classmethod
    def gather(cls, config: Config, listeners: list[Listener]) -> FrontKit:
        keys = tuple((config.keys_dir / name).read_text() for name in HOST_KEY_NAMES)
        cert = key = ""
        if any(listener.name == "rendezvous" for listener in listeners):
            cert = (config.keys_dir / SERVER_CERT).read_text()
            key = (config.keys_dir / SERVER_KEY).read_text()
        return cls(listeners, keys, cert, key, config.audit_path)

    def setup(self) -> tuple[FrontSetup, list[int]]:
        """The FrontSetup message and its descriptors: a new O_APPEND descriptor of the
        audit trail (the caller closes it once sent), then the listeners."""
        message = FrontSetup(
            tuple(listener.name for listener in self.listeners),
            self.host_keys,
            self.tls_cert,
            self.tls_key,
        )
        audit = os.open(
            self.audit_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        return message, [audit, *(listener.sock.fileno() for listener in self.listeners)]


class Front:
    """The SSH front, a child process: started, watched, and given time to drain."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.stopping = False
        self.exited = trio.Event()
        self._process: trio.Process | None = None

    async def run(
        self,
        ready: trio.Event,
        serve_broker: Callable[[trio.socket.SocketType], Awaitable[None]],
    ) -> None:
        """Start the front and hold it until it exits. `serve_broker` takes the
        connections it opens; `ready` is set once it says it accepts connections."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ, **{BROKER_ENV: str(theirs.fileno())})
        # glibc: keep freed memory instead of returning it at once; bulk transfers
        # otherwise fault in fresh pages for every MB they move (docs/benchmarks.md).
        env.setdefault("MALLOC_TRIM_THRESHOLD_", str(16 * 1024 * 1024))
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(4 * 1024 * 1024))
        try:
            front = await trio.lowlevel.open_process(
                self.argv, pass_fds=(theirs.fileno(),), env=env
            )
        finally:
            theirs.close()
        self._process = front
        broker = trio.socket.from_stdlib_socket(ours)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_broker, broker)
                status = await front.wait()
                self.exited.set()
                if not ready.is_set():
                    raise FrontDied(f"the SSH front exited at start (status {status})")
                if not self.stopping:
                    raise FrontDied(f"the SSH front exited with status {status}")
                nursery.cancel_scope.cancel()
        finally:
            broker.close()
            with trio.CancelScope(shield=True):
                front.terminate()
                with trio.move_on_after(10):
                    await front.wait()
                front.kill()

    def kill(self) -> None:
        """SIGKILL, no drain: for a second interrupt."""
        self.stopping = True
        if self._process is not None and self._process.returncode is None:
            self._process.kill()

    async def stop(self, timeout: float) -> None:
        """SIGTERM (the front drains) and wait for it to exit, at most `timeout` seconds."""
        self.stopping = True
        if self._process is not None:
            self._process.terminate()
        with trio.move_on_after(timeout):
            await self.exited.wait()
