"""The SSH front's process: asyncio, network-facing, never builds sandboxes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import signal
import socket
import ssl
import sys
from collections.abc import Awaitable
from typing import TypeVar

import asyncssh

from gateway.config import Config, split_listen
from gateway.front.api import PlatformAPI
from gateway.front.attached import AttachedSessions
from gateway.front.gate import Gate, admission_limits, start_stream, start_tls
from gateway.front.observe import Observer, serve_metrics
from gateway.front.rendezvous import Rendezvous, RendezvousProtocol
from gateway.front.ssh import ALGORITHMS, GatewayServer, PreAuthLimits, load_host_keys, start_ssh
from gateway.front.ssh_session import SessionServices
from gateway.keys import HOST_KEY_NAMES
from gateway.store import Store, open_store
from gateway.tls import SERVER_CERT, SERVER_KEY

log = logging.getLogger(__name__)
Server = TypeVar("Server")
# What the front writes on its ready pipe once every listener is open; a JSON line
# {"table", "listen", "reason"} instead says which one could not be (see run()).
READY = b"ready\n"
# Accept queue of each listener: a burst is accepted (and then waits in its gate) rather
# than left to SYN retries.
BACKLOG = 1024


async def serve(
    config: Config, ready_fd: int | None = None, lifeline_fd: int | None = None
) -> None:
    """Listen for SSH until SIGTERM, or until the manager's end of `lifeline_fd`
    closes (the manager is gone); tell `ready_fd` once listening."""
    store = open_store(config)
    host, port = config.ssh.host_port
    sessions = AttachedSessions()
    observer = Observer(config.audit_path)
    services = SessionServices(
        manager_socket=config.manager_socket,
        banner=config.dynos.banner,
        idle_timeout=config.dynos.idle_timeout,
        sessions=sessions,
        observer=observer,
        accept_env=config.ssh.accept_env,
        public_address=config.ssh.public_address,
    )
    limits = PreAuthLimits(config.ssh)
    _raise_open_files_limit(config)
    options = await asyncssh.SSHServerConnectionOptions.construct(
        server_factory=lambda: GatewayServer(store, services, limits),
        server_host_keys=load_host_keys([str(config.keys_dir / n) for n in HOST_KEY_NAMES]),
        **ALGORITHMS,
        encoding=None,
        line_editor=False,
        agent_forwarding=False,
        x11_forwarding=False,
        allow_scp=False,
        keepalive_interval=config.ssh.keepalive_interval,
        keepalive_count_max=config.ssh.keepalive_count_max,
        login_timeout=config.ssh.login_grace_time,
    )
    # asyncssh.create_server would start the SSH handshake on accept; the gate starts it
    # once the connection is admitted (gateway/front/gate.py).
    gates = [
        Gate("ssh", admission_limits(config.ssh), observer, start_ssh(options), limits.refusal)
    ]
    loop = asyncio.get_running_loop()
    servers: list[asyncio.AbstractServer] = []
    try:
        servers.append(
            await _listen(
                "ssh",
                config.ssh.listen,
                loop.create_server(
                    gates[0].protocol, host, port, reuse_address=True, backlog=BACKLOG
                ),
            )
        )
        log.info("SSH listening on %s:%d", host, port)
        servers += await _heroku_listeners(config, store, sessions, observer, gates)
        if config.metrics.listen:
            m_host, m_port = split_listen(config.metrics.listen)
            servers.append(
                await _listen(
                    "metrics",
                    config.metrics.listen,
                    serve_metrics(m_host, m_port, config.manager_socket),
                )
            )
    except ListenFailed:
        for listener in servers:
            listener.close()
        raise
    if ready_fd is not None:
        os.write(ready_fd, READY)
        os.close(ready_fd)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if lifeline_fd is not None:
        loop.add_reader(lifeline_fd, stop.set)
    await stop.wait()
    log.info("SSH front stopping: no new connections")
    for listener in servers:
        listener.close()
    for gate in gates:
        gate.close()
    await sessions.drain(config.shutdown.drain_timeout)
    for listener in servers:
        await listener.wait_closed()
    observer.close()
    log.info("SSH front stopped")


async def _heroku_listeners(
    config: Config, store: Store, sessions: AttachedSessions, observer: Observer, gates: list[Gate]
) -> list[asyncio.AbstractServer]:
    """The rendezvous port (TLS) and the Platform API the heroku CLI talks to, each
    behind a gate of its own (the [ssh] admission settings, their own slots)."""
    if not config.rendezvous.listen or not config.api.listen:
        return []
    rendezvous = Rendezvous(
        config.rendezvous.attach_timeout, config.dynos.idle_timeout, sessions, observer
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.keys_dir / SERVER_CERT, config.keys_dir / SERVER_KEY)
    r_host, r_port = split_listen(config.rendezvous.listen)
    loop = asyncio.get_running_loop()
    limits = admission_limits(config.ssh)
    # The TLS handshake starts once the gate admits the connection.
    rendezvous_gate = Gate(
        "rendezvous", limits, observer,
        start_tls(context, lambda p: RendezvousProtocol(rendezvous, p.settle), 10),
    )  # fmt: skip
    rendezvous_server = await _listen(
        "rendezvous",
        config.rendezvous.listen,
        loop.create_server(
            rendezvous_gate.protocol, r_host, r_port, reuse_address=True, backlog=BACKLOG
        ),
    )
    platform = PlatformAPI(
        store, rendezvous, config.manager_socket, config.rendezvous.public_host, r_port
    )
    a_host, a_port = split_listen(config.api.listen)
    api_gate = Gate(
        "api", limits, observer, start_stream(lambda r, w, p: platform.handle(r, w, p.settle))
    )
    try:
        api_server = await _listen(
            "api",
            config.api.listen,
            loop.create_server(
                api_gate.protocol, a_host, a_port, reuse_address=True, backlog=BACKLOG
            ),
        )
    except ListenFailed:
        rendezvous_server.close()
        raise
    gates += [rendezvous_gate, api_gate]
    log.info("rendezvous listening on %s:%d, API on %s:%d", r_host, r_port, a_host, a_port)
    return [rendezvous_server, api_server]


def _raise_open_files_limit(config: Config) -> None:
    """Room for what the gates may hold (each listener's slots and waiting room) and the
    sessions: raise the soft open-files limit to the hard one, and say if that is short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max(soft, 65536) if hard == resource.RLIM_INFINITY else hard
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    limits = admission_limits(config.ssh)
    held = 3 * (limits.slots + limits.waiting) + 4 * config.dynos.max_per_host
    if wanted < held:
        log.warning(
            "open files limit %d is below what admission and sessions may hold (%d): "
            "raise it (LimitNOFILE=) or lower max_startups and max_waiting", wanted, held,
        )  # fmt: skip


class ListenFailed(Exception):
    """A listener that could not be opened: which `[table] listen`, and why."""

    def __init__(self, table: str, listen: str, reason: str) -> None:
        super().__init__(f"[{table}] listen {listen}: {reason}")
        self.table, self.listen, self.reason = table, listen, reason


async def _listen(table: str, listen: str, opening: Awaitable[Server]) -> Server:
    """Await `opening` (a listener being bound); an OSError (port taken, address not
    on this host, a low port without privilege) becomes ListenFailed naming the key."""
    try:
        return await opening
    except OSError as exc:
        if isinstance(exc, socket.gaierror):  # a host name that does not resolve
            reason = f"{exc.strerror}"
        elif exc.errno:  # asyncio words it "error while attempting to bind on ...: REASON"
            reason = os.strerror(exc.errno)
        else:
            reason = str(exc)
        raise ListenFailed(table, listen, reason[:1].lower() + reason[1:]) from None


def run(config: Config, ready_fd: int | None = None, lifeline_fd: int | None = None) -> int:
    """Serve; 0 after a clean stop. A listener that cannot be opened is told on
    `ready_fd` (or stderr) in one line, status 1: the manager prints it, no traceback."""
    # Ctrl-C on a terminal reaches the whole process group, from the first moment on;
    # the manager decides what it means.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        asyncio.run(serve(config, ready_fd, lifeline_fd))
    except ListenFailed as exc:
        if ready_fd is None:
            print(f"gateway: {exc}", file=sys.stderr)
        else:
            failure = {"table": exc.table, "listen": exc.listen, "reason": exc.reason}
            os.write(ready_fd, json.dumps(failure).encode() + b"\n")
        return 1
    return 0
