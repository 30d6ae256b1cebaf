"""The SSH front's process: asyncio, network-facing, never builds sandboxes."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl

import asyncssh

from gateway.config import Config, split_listen
from gateway.front.api import PlatformAPI
from gateway.front.observe import Observer, serve_metrics
from gateway.front.rendezvous import Rendezvous, RendezvousProtocol
from gateway.front.sessions import ActiveSessions
from gateway.front.ssh import ALGORITHMS, GatewayServer, PreAuthLimits, load_host_keys
from gateway.keys import HOST_KEY_NAMES
from gateway.store import Store
from gateway.tls import SERVER_CERT, SERVER_KEY

log = logging.getLogger("gateway.front")


async def serve(
    config: Config, ready_fd: int | None = None, lifeline_fd: int | None = None
) -> None:
    """Listen for SSH until SIGTERM, or until the manager's end of `lifeline_fd`
    closes (the manager is gone); tell `ready_fd` once listening."""
    store = Store(config.db_path)
    host, port = config.ssh.host_port
    sessions = ActiveSessions()
    observer = Observer(config.audit_path)
    context = {
        "sessions": sessions,
        "observer": observer,
        "manager_socket": config.manager_socket,
        "banner": config.dynos.banner,
        "idle_timeout": config.dynos.idle_timeout,
        "accept_env": config.ssh.accept_env,
        "public_address": config.ssh.public_address,
    }
    limits = PreAuthLimits(config.ssh)
    server = await asyncssh.create_server(
        lambda: GatewayServer(store, context, limits),
        host,
        port,
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
        reuse_address=True,
    )
    log.info("SSH listening on %s:%d", host, port)
    servers = [server, *await _heroku_listeners(config, store, sessions, observer)]
    if config.metrics.listen:
        m_host, m_port = split_listen(config.metrics.listen)
        servers.append(await serve_metrics(m_host, m_port, config.manager_socket))
    if ready_fd is not None:
        os.write(ready_fd, b"ready\n")
        os.close(ready_fd)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # Ctrl-C on a terminal reaches the whole process group; the manager decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if lifeline_fd is not None:
        loop.add_reader(lifeline_fd, stop.set)
    await stop.wait()
    log.info("SSH front stopping: no new connections")
    for listener in servers:
        listener.close()
    await sessions.drain(config.shutdown.drain_timeout)
    for listener in servers:
        await listener.wait_closed()
    log.info("SSH front stopped")


async def _heroku_listeners(
    config: Config, store: Store, sessions: ActiveSessions, observer: Observer
) -> list[asyncio.AbstractServer]:
    """The rendezvous port (TLS) and the Platform API the heroku CLI talks to."""
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
    rendezvous_server = await loop.create_server(
        lambda: RendezvousProtocol(rendezvous), r_host, r_port, ssl=context,
        ssl_handshake_timeout=10, reuse_address=True,
    )  # fmt: skip
    platform = PlatformAPI(
        store, rendezvous, config.manager_socket, config.rendezvous.public_host, r_port
    )
    a_host, a_port = split_listen(config.api.listen)
    api_server = await asyncio.start_server(platform.handle, a_host, a_port, reuse_address=True)
    log.info("rendezvous listening on %s:%d, API on %s:%d", r_host, r_port, a_host, a_port)
    return [rendezvous_server, api_server]


def run(config: Config, ready_fd: int | None = None, lifeline_fd: int | None = None) -> None:
    asyncio.run(serve(config, ready_fd, lifeline_fd))
