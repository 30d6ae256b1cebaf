"""The SSH front's process: asyncio, network-facing, never builds sandboxes."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import asyncssh

from gateway.config import Config
from gateway.front.ssh import GatewayServer
from gateway.keys import HOST_KEY_NAMES
from gateway.store import Store

log = logging.getLogger("gateway.front")


async def serve(
    config: Config, ready_fd: int | None = None, lifeline_fd: int | None = None
) -> None:
    """Listen for SSH until SIGTERM, or until the manager's end of `lifeline_fd`
    closes (the manager is gone); tell `ready_fd` once listening."""
    store = Store(config.db_path)
    host, port = config.ssh.host_port
    context = {
        "manager_socket": config.manager_socket,
        "banner": config.dynos.banner,
        "idle_timeout": config.dynos.idle_timeout,
    }
    server = await asyncssh.create_server(
        lambda: GatewayServer(store, context),
        host,
        port,
        server_host_keys=[str(config.keys_dir / name) for name in HOST_KEY_NAMES],
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
    log.info("SSH front stopping")
    server.close()
    await server.wait_closed()


def run(config: Config, ready_fd: int | None = None, lifeline_fd: int | None = None) -> None:
    asyncio.run(serve(config, ready_fd, lifeline_fd))
