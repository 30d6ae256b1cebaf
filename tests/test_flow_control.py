"""The window adaptation in gateway/front/channel.py, against a real asyncssh client.

A reader that takes one packet at a time (resume, one packet, pause: a dyno reading
slowly) made stock asyncssh grant a whole new window on each packet, so the data held
in its receive buffer grew by a window per cycle. With FlowControlledChannel the client
may never have more in flight and buffered than one window.
"""

from __future__ import annotations

import asyncio

import asyncssh
import pytest

from gateway.front.channel import adopt

WINDOW = 256 * 1024
TOTAL = 8 * 1024 * 1024


class SlowReader(asyncssh.SSHServerSession):  # type: ignore[type-arg]
    def __init__(self) -> None:
        self.received = 0
        self.peak_buffered = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, chan: asyncssh.SSHServerChannel) -> None:
        self.chan = chan

    def exec_requested(self, command: str) -> bool:
        return True

    def data_received(self, data: bytes, datatype: object) -> None:
        self.received += len(data)
        buffered = sum(len(chunk) for chunk, _ in self.chan._recv_buf)
        self.peak_buffered = max(self.peak_buffered, buffered)
        self.chan.pause_reading()
        asyncio.get_running_loop().call_later(0.002, self.chan.resume_reading)

    def eof_received(self) -> bool:
        self.chan.exit(0)
        if not self.done.done():
            self.done.set_result(None)
        return True


async def upload(flow_controlled: bool) -> int:
    sessions: list[SlowReader] = []
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")

    class Server(asyncssh.SSHServer):
        def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
            self.conn = conn

        def begin_auth(self, username: str) -> bool:
            return True

        def public_key_auth_supported(self) -> bool:
            return True

        def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
            return True

        def session_requested(self) -> tuple[asyncssh.SSHServerChannel, SlowReader]:
            channel = self.conn.create_server_channel(encoding=None, window=WINDOW)
            if flow_controlled:
                channel = adopt(channel)
            sessions.append(SlowReader())
            return channel, sessions[-1]

    server = await asyncssh.create_server(
        Server, "127.0.0.1", 0, server_host_keys=[host_key], encoding=None
    )
    port = server.sockets[0].getsockname()[1]
    try:
        async with (
            asyncssh.connect(
                "127.0.0.1", port, username="x", client_keys=[client_key], known_hosts=None
            ) as conn,
            conn.create_process("sink", encoding=None) as process,
        ):
            chunk = b"x" * 65536
            for _ in range(TOTAL // len(chunk)):
                process.stdin.write(chunk)
                await process.stdin.drain()
            process.stdin.write_eof()
            await asyncio.wait_for(sessions[0].done, 60)
    finally:
        server.close()
    assert sessions[0].received == TOTAL
    return sessions[0].peak_buffered


def test_buffered_data_never_exceeds_one_window() -> None:
    peak = asyncio.run(upload(flow_controlled=True))
    assert peak <= WINDOW


def test_stock_asyncssh_would_buffer_more_than_a_window() -> None:
    """Guards the reason for the adaptation: if asyncssh fixes this, the adaptation can go."""
    peak = asyncio.run(upload(flow_controlled=False))
    if peak <= WINDOW:
        pytest.fail(
            f"asyncssh {asyncssh.__version__} no longer over-grants window (peak {peak}); "
            "gateway/front/channel.py may be removed"
        )
