"""What a node answers HAProxy's agent-check (`agent-check` on a server line): its free
dyno capacity as a weight, so HAProxy's own balancing steers new sessions to the nodes
with room (haproxy.org's configuration manual, "agent-check").

    up ready 37%    room for 37% of max_per_host more dynos; `ready` ends a drain
    drain           full, or shutting down: no new sessions, those open stay

The weight is a percentage of the server's configured weight in haproxy.cfg; a node
with any room left says at least 1%, since 0% would drain it.
"""

from __future__ import annotations


def agent_reply(running: int, capacity: int, draining: bool) -> str:
    """The agent's one line for a node running `running` dynos of at most `capacity`."""
    free = capacity - running
    if draining or free <= 0:
        return "drain\n"
    return f"up ready {max(1, free * 100 // capacity)}%\n"
