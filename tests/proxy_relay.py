"""An SSH ProxyCommand that does what HAProxy's `send-proxy-v2` does: connect to the
gateway, send a PROXY protocol v2 header naming CLIENT_IP as the client, then relay
stdin and stdout. For tests: `ssh -o ProxyCommand="python -m tests.proxy_relay HOST
PORT CLIENT_IP" ...` (the addresses stay on loopback; CLIENT_IP is only a claim)."""

from __future__ import annotations

import os
import selectors
import socket
import sys

from gateway.core.proxy_protocol import build


def main(host: str, port: int, client_ip: str) -> None:
    sock = socket.create_connection((host, port))
    sock.sendall(build((client_ip, 40000 + os.getpid() % 20000), (host, port)))
    selector = selectors.DefaultSelector()
    selector.register(0, selectors.EVENT_READ)
    selector.register(sock, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj == 0:
                data = os.read(0, 65536)
                if not data:
                    selector.unregister(0)
                    sock.shutdown(socket.SHUT_WR)
                else:
                    sock.sendall(data)
            else:
                data = sock.recv(65536)
                if not data:
                    return
                os.write(1, data)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
