"""The `[cluster]` table's settings (docs/configuration.md): this node among several
sharing one PostgreSQL database. Part of gateway/config.py, in a module of its own."""

from __future__ import annotations

import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class ClusterSettings:
    """This node among several sharing one PostgreSQL database (docs/scale-out.md)."""

    # The node's name in dyno records and `gateway nodes`: "" means the host name.
    node: str = ""
    # The host clients of this node are told (the rendezvous host in attach_url): ""
    # means [rendezvous] public_host.
    public_host: str = ""
    # Seconds between this node's heartbeats; a node silent for dead_after seconds is
    # dead, and the others close its dynos as crashed.
    heartbeat: int = 5
    dead_after: int = 30
    # HAProxy's agent-check: the node's free dyno capacity as a weight (`up 37%`, or
    # `drain`). Served when database_url is set; "" disables it.
    agent_listen: str = "127.0.0.1:9465"

    @property
    def node_name(self) -> str:
        return self.node or socket.gethostname()

    def problem(self) -> str | None:
        """What makes these settings unusable, or None."""
        if not 1 <= self.heartbeat < self.dead_after:
            return (
                "'cluster.heartbeat' must be at least 1 and below 'cluster.dead_after' "
                f"(got {self.heartbeat} and {self.dead_after})"
            )
        return None
