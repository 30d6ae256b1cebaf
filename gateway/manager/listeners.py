"""The front's listening sockets, opened by the privileged side: bound here (so that
port 22 needs no privilege in the front) or taken from systemd (LISTEN_FDS), then
handed to the front with its setup (gateway/manager/front.py)."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass

from gateway.config import Config, split_listen
from gateway.core.listen_fds import VARIABLES, ListenFdsError, passed_sockets

log = logging.getLogger(__name__)
# Accept queue of each listener: a burst is accepted (and then waits in its gate) rather
# than left to SYN retries.
BACKLOG = 1024
TABLES = ("ssh", "rendezvous", "api", "metrics")


class ListenerUnavailable(Exception):
    """A listener that cannot be opened: which `[table] listen`, and why."""

    def __init__(self, table: str, listen: str, reason: str) -> None:
        super().__init__(f"[{table}] listen {listen}: {reason}")
        self.table = table


class PassedSocketsUnusable(Exception):
    """systemd passed sockets we cannot use as they are; the message says how to fix it."""


@dataclass
class Listener:
    name: str  # its table: ssh, rendezvous, api, metrics
    sock: socket.socket

    @property
    def address(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def open_listeners(config: Config, environ: MutableMapping[str, str]) -> list[Listener]:
    """Every enabled listener: those systemd passed (by name), the others bound to their
    `[table] listen`. The LISTEN_* variables are taken out of `environ`, so that no
    child (the front, a dyno) mistakes them for its own."""
    try:
        passed = passed_sockets(environ, os.getpid())
    except ListenFdsError as exc:
        raise PassedSocketsUnusable(f"sockets passed by systemd: {exc}") from None
    finally:
        for name in VARIABLES:
            environ.pop(name, None)
    listeners = [Listener(name, _adopt(name, fd)) for name, fd in passed]
    try:
        for table in TABLES:
            listen = getattr(config, table).listen
            if listen and not any(listener.name == table for listener in listeners):
                listeners += [Listener(table, sock) for sock in _bind(table, listen)]
    except BaseException:
        close_all(listeners)
        raise
    for listener in listeners:
        log.info("%s listening on %s", listener.name, listener.address)
    return listeners


def close_all(listeners: list[Listener]) -> None:
    for listener in listeners:
        listener.sock.close()


def _adopt(name: str, fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    sock.set_inheritable(False)
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_ACCEPTCONN
    ):
        sock.close()
        raise PassedSocketsUnusable(
            f"the socket passed by systemd as {name!r} is not a listening stream socket "
            "(ListenStream=)"
        )
    return sock


def _bind(table: str, listen: str) -> list[socket.socket]:
    """Sockets listening on every address `listen`'s host resolves to, as asyncio's
    create_server binds them; ListenerUnavailable naming the key on failure (a port
    taken, an address not on this host, a name that does not resolve)."""
    host, port = split_listen(listen)
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        if isinstance(exc, socket.gaierror):  # a host name that does not resolve
            reason = f"{exc.strerror}"
        elif exc.errno:
            reason = os.strerror(exc.errno)
        else:
            reason = str(exc)
        raise ListenerUnavailable(table, listen, reason[:1].lower() + reason[1:]) from None
    return sockets
