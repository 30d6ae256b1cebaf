"""HAProxy's agent-check endpoint ([cluster] agent_listen): one line per connection, the
node's free dyno capacity (gateway/core/agent_check.py), then close. Served by the
manager, which knows what runs here and whether it is shutting down."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable

import trio

from gateway.config import split_listen

log = logging.getLogger(__name__)

ANSWER_TIMEOUT = 5


class AgentUnavailable(Exception):
    """The agent-check listener could not be opened: the key, and why."""


async def serve_agent(
    listen: str,
    reply: Callable[[], str],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer every connection to `listen` with `reply()` until cancelled."""
    host, port = split_listen(listen)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise AgentUnavailable(f"[cluster] agent_listen {listen}: {reason.lower()}") from None

    async def answer(stream: trio.SocketStream) -> None:
        async with stream:
            with trio.move_on_after(ANSWER_TIMEOUT):
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(reply().encode())

    log.info("agent-check on %s:%d", host, port)
    task_status.started()
    await trio.serve_listeners(answer, listeners)
