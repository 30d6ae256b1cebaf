"""The SSH front's process: asyncio, network-facing, never builds sandboxes.

It starts by giving up everything it does not need (gateway/privileges.py,
gateway/seccomp.py), then asks the manager for its kit (FrontHello): listening sockets,
host keys, the rendezvous key and the audit trail, all handed over. It holds no
database, key file or port of its own; the connection that brought the kit is its
lifeline: when the manager closes it, the front stops.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import socket
import ssl
import sys
from collections.abc import Iterable

import asyncssh

from gateway.audit import AuditLog
from gateway.config import Config
from gateway.core import protocol as p
from gateway.front import crypto
from gateway.front.api import PlatformAPI
from gateway.front.attached import AttachedSessions
from gateway.front.gate import Gate, admission_limits, start_stream, start_tls
from gateway.front.imports import freeze_imports
from gateway.front.link import Connector, ManagerLink, connector
from gateway.front.observe import Observer, serve_metrics
from gateway.front.rendezvous import Rendezvous, RendezvousProtocol
from gateway.front.ssh import (
    ALGORITHMS,
    GatewayServer,
    PreAuthLimits,
    ask_manager,
    load_host_keys,
    start_ssh,
)
from gateway.front.ssh_session import SessionServices
from gateway.ipc import ManagerError
from gateway.privileges import PrivilegeError, drop_privileges, front_user
from gateway.seccomp import SeccompUnavailable, deny_dangerous_syscalls

log = logging.getLogger(__name__)
# Accept queue of each listener (as the manager made them): a burst is accepted (and
# then waits in its gate) rather than left to SYN retries.
BACKLOG = 1024


async def serve(config: Config, manager: Connector) -> None:
    """Take the kit from the manager, serve its listeners until SIGTERM or until the
    manager closes the kit's connection (it is gone)."""
    crypto.install()  # packet crypto keyed once per direction (gateway/front/crypto.py)
    lifeline = await ManagerLink.open(manager)
    setup, fds = await lifeline.front_setup()
    audit = AuditLog.on_descriptor(fds[0])
    sockets = [socket.socket(fileno=fd) for fd in fds[1:]]
    listeners = list(zip(setup.listeners, sockets, strict=True))
    sessions = AttachedSessions()
    observer = Observer(audit)
    services = SessionServices(
        manager=manager,
        banner=config.dynos.banner,
        idle_timeout=config.dynos.idle_timeout,
        sessions=sessions,
        observer=observer,
        accept_env=config.ssh.accept_env,
        public_address=config.ssh.public_address,
    )
    limits = PreAuthLimits(config.ssh)
    check_key = ask_manager(manager)
    _raise_open_files_limit(config)
    options = await asyncssh.SSHServerConnectionOptions.construct(
        server_factory=lambda: GatewayServer(services, limits, check_key),
        server_host_keys=load_host_keys([key.encode() for key in setup.host_keys]),
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
        Gate(
            "ssh",
            admission_limits(config.ssh),
            observer,
            start_ssh(options),
            limits.refusal,
            proxy_protocol=config.ssh.proxy_protocol,
        )
    ]
    loop = asyncio.get_running_loop()
    servers: list[asyncio.AbstractServer] = [
        await loop.create_server(gates[0].protocol, sock=sock, backlog=BACKLOG)
        for name, sock in listeners
        if name == "ssh"
    ]
    servers += await _heroku_listeners(config, setup, listeners, sessions, observer, gates, manager)
    for name, sock in listeners:
        if name == "metrics":
            servers.append(await serve_metrics(sock, manager))
    await lifeline.front_ready()
    log.info("SSH front ready: %s", ", ".join(sorted({name for name, _ in listeners})))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    watch = loop.create_task(lifeline.until_closed())
    watch.add_done_callback(lambda _: stop.set())
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
    watch.cancel()
    lifeline.close()
    log.info("SSH front stopped")


async def _heroku_listeners(
    config: Config,
    setup: p.FrontSetup,
    listeners: Iterable[tuple[str, socket.socket]],
    sessions: AttachedSessions,
    observer: Observer,
    gates: list[Gate],
    manager: Connector,
) -> list[asyncio.AbstractServer]:
    """The rendezvous port (TLS) and the Platform API the heroku CLI talks to, each
    behind a gate of its own (the [ssh] admission settings, their own slots)."""
    rendezvous_socks = [sock for name, sock in listeners if name == "rendezvous"]
    api_socks = [sock for name, sock in listeners if name == "api"]
    if not rendezvous_socks or not api_socks:
        return []
    rendezvous = Rendezvous(
        config.rendezvous.attach_timeout, config.dynos.idle_timeout, sessions, observer
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_cert_chain(context, setup.tls_cert, setup.tls_key)
    loop = asyncio.get_running_loop()
    limits = admission_limits(config.ssh)
    # The TLS handshake starts once the gate admits the connection.
    rendezvous_gate = Gate(
        "rendezvous", limits, observer,
        start_tls(context, lambda p: RendezvousProtocol(rendezvous, p.settle, p.peer), 10),
        proxy_protocol=config.rendezvous.proxy_protocol,
    )  # fmt: skip
    # attach_url names the port the rendezvous really listens on (systemd may pass it).
    r_port = rendezvous_socks[0].getsockname()[1]
    a_port = api_socks[0].getsockname()[1]
    # This node's public host: a rendezvous (and a log stream) must reach this node.
    platform = PlatformAPI(rendezvous, manager, config.attach_host, r_port, a_port)
    api_gate = Gate(
        "api", limits, observer, start_stream(lambda r, w, p: platform.handle(r, w, p.settle)),
        proxy_protocol=config.api.proxy_protocol,
    )  # fmt: skip
    servers: list[asyncio.AbstractServer] = [
        await loop.create_server(rendezvous_gate.protocol, sock=sock, backlog=BACKLOG)
        for sock in rendezvous_socks
    ]
    servers += [
        await loop.create_server(api_gate.protocol, sock=sock, backlog=BACKLOG)
        for sock in api_socks
    ]
    gates += [rendezvous_gate, api_gate]
    return servers


def _load_cert_chain(context: ssl.SSLContext, cert: str, key: str) -> None:
    """The rendezvous certificate chain and key from memory: ssl reads them only from a
    path, so they go through memory-only files (memfd), never the disk."""
    files = []
    try:
        for name, text in (("cert", cert), ("key", key)):
            fd = os.memfd_create(f"rendezvous-{name}", os.MFD_CLOEXEC)
            files.append(fd)
            os.write(fd, text.encode())
        context.load_cert_chain(f"/proc/self/fd/{files[0]}", f"/proc/self/fd/{files[1]}")
    finally:
        for fd in files:
            os.close(fd)


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


def run(config: Config, broker_fd: int | None = None) -> int:
    """Give up privileges, then serve; 0 after a clean stop. `broker_fd`: the broker of
    the manager that started us; without one, we connect to `[front] socket`."""
    # Ctrl-C on a terminal reaches the whole process group, from the first moment on;
    # the manager decides what it means.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    freeze_imports()  # while we can still read every module
    try:
        drop_privileges(front_user(config))
        denied = deny_dangerous_syscalls()
    except (PrivilegeError, SeccompUnavailable, OSError) as exc:
        print(f"gateway: the SSH front cannot start safely: {exc}", file=sys.stderr)
        return 1
    log.info("SSH front running as uid %d, %d system calls denied", os.getuid(), denied)
    try:
        asyncio.run(serve(config, connector(broker_fd, config.manager_socket)))
    except ManagerError as exc:
        print(f"gateway: the SSH front stops: {exc}", file=sys.stderr)
        return 1
    return 0
