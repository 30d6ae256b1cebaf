"""The reserved SSH commands that do not attach to a dyno: run:detached, run:list,
run:stop, run:logs, run:help."""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING

from gateway.core import commands
from gateway.core.commands import format_ps, size_label

if TYPE_CHECKING:
    from gateway.front.session import DynoSession

log = logging.getLogger("gateway.front")


class ReservedCommand:
    def __init__(self, session: DynoSession, command: commands.Reserved) -> None:
        self.session = session
        self.command = command
        self.app = session.context.app

    async def run(self) -> None:
        command = self.command
        log.info("reserved command %s command=%s", self.session.where, type(command).__name__)
        if isinstance(command, commands.Run):
            await self.detached(command)
        elif isinstance(command, commands.RunList):
            self.list(command.json)
        elif isinstance(command, commands.RunStop):
            await self.stop(command.dyno)
        elif isinstance(command, commands.RunLogs):
            await self.logs(command)
        else:
            self.session.write(commands.HELP)
            self.session.exit(0)

    async def _request(self, kind: str, **fields: object) -> dict[str, object] | None:
        """Send one request; the first reply, or None after reporting an error."""
        link = await self.session.open_link()
        await link.send(kind, app=self.app, **fields)
        reply = await link.receive()
        if reply is None:
            self.session.write("gateway: the dyno manager went away; try again\n", stderr=True)
            self.session.exit(1)
            return None
        message, _ = reply
        if message["type"] == "error":
            self.session.write(f"gateway: {message.get('message')}\n", stderr=True)
            self.session.exit(1)
            return None
        return message

    async def detached(self, command: commands.Run) -> None:
        reply = await self._request(
            "run",
            command=command.command,
            pty=None,
            env=command.env,
            size=command.size,
            attach=False,
            connection=self.session.context.connection,
        )
        if reply is None:
            return
        dyno, size = reply["dyno"], size_label(str(reply.get("size", "")))
        host, port = self.session.context.public_address
        ssh = f"ssh {self.app}@{host}" if port == 22 else f"ssh -p {port} {self.app}@{host}"
        self.session.write(
            f"Running `{command.command}` detached... up, {dyno} ({size})\n"
            f"Use `{ssh} run:logs -p {dyno} --tail` to view the output.\n"
        )
        self.session.exit(0)

    def list(self, as_json: bool) -> None:
        rows = [d.row() for d in self.session.context.store.list_dynos(self.app, running=True)]
        if as_json:
            self.session.write(json.dumps([row.as_json() for row in rows], indent=2) + "\n")
        else:
            self.session.write(format_ps(rows, time.time()))
        self.session.exit(0)

    async def stop(self, dyno: str) -> None:
        if await self._request("stop", dyno=dyno) is None:
            return
        self.session.write(f"Stopping {dyno} dyno on {self.app}... done\n")
        self.session.exit(0)

    async def logs(self, command: commands.RunLogs) -> None:
        """The app log; with --tail, new lines until the client leaves (or presses Ctrl-C
        on a terminal). The client's pace sets ours: while its channel is full we stop
        reading, and the manager drops lines for us and says how many."""
        link = await self.session.open_link()
        await link.send(
            "logs", app=self.app, dyno=command.dyno, lines=command.lines, tail=command.tail
        )
        interrupted = False

        def on_input(data: bytes) -> None:
            nonlocal interrupted
            if b"\x03" in data:  # Ctrl-C on a terminal in raw mode
                interrupted = True
                link.close()

        self.session.on_input = on_input
        while True:
            await self.session.writable()
            reply = await link.receive()
            if interrupted:
                break
            if reply is None:
                self.session.write("gateway: the dyno manager went away\n", stderr=True)
                self.session.exit(1)
                return
            message, _ = reply
            kind = message["type"]
            if kind == "log":
                self.session.write("".join(f"{line}\n" for line in message.get("lines", [])))
            elif kind == "dropped":
                self.session.write(
                    f"gateway: {message.get('count')} log lines dropped (reading too slowly)\n",
                    stderr=True,
                )
            elif kind == "error":
                self.session.write(f"gateway: {message.get('message')}\n", stderr=True)
                self.session.exit(1)
                return
            elif kind == "end":
                break
        self.session.exit(0)
