"""The reserved SSH commands that do not attach to a dyno: run:detached, run:list,
run:stop, run:logs, run:help. They see the session they run in only as a `Console`."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Protocol

from gateway.core import commands
from gateway.core import protocol as p
from gateway.core.commands import dyno_json, format_ps, size_label
from gateway.eventlog import EventLog
from gateway.front.link import ManagerLink
from gateway.ipc import ManagerGone, ManagerRefused

log = logging.getLogger(__name__)


class Console(Protocol):
    """What a reserved command needs of the session it runs in."""

    app: str
    connection: str
    log: EventLog

    def write(self, text: str, stderr: bool = False) -> None:
        """Text for the client (CRLF line ends on a raw terminal)."""
        ...

    def exit(self, status: int) -> None: ...

    def fail(self, message: str) -> None:
        """`gateway: MESSAGE` on stderr, exit status 1."""
        ...

    async def writable(self) -> None:
        """Until the client takes output again (its channel window is open)."""
        ...

    async def open_link(self) -> ManagerLink:
        """A conversation with the manager, closed with the session."""
        ...

    def on_interrupt(self, callback: Callable[[], None]) -> None:
        """Call `callback` when the client presses Ctrl-C on a terminal."""
        ...

    def ssh_command(self) -> str:
        """How a user reaches this app from outside: `ssh [-p PORT] APP@HOST`."""
        ...


class ReservedCommand:
    def __init__(self, console: Console, command: commands.Reserved) -> None:
        self.console = console
        self.command = command
        self.app = console.app

    async def run(self) -> None:
        command = self.command
        self.console.log.info("reserved command command=%s", type(command).__name__)
        try:
            if isinstance(command, commands.Run):
                await self.detached(command)
            elif isinstance(command, commands.RunList):
                await self.list(command.json)
            elif isinstance(command, commands.RunStop):
                await self.stop(command.dyno)
            elif isinstance(command, commands.RunLogs):
                await self.logs(command)
            else:
                self.console.write(commands.HELP)
                self.console.exit(0)
        except ManagerRefused as exc:
            self.console.fail(str(exc))
        except ManagerGone:
            self.console.fail("the dyno manager went away; try again")
        except p.LocalProtocolError as exc:  # a request too large for the protocol
            self.console.fail(str(exc))

    async def detached(self, command: commands.Run) -> None:
        link = await self.console.open_link()
        run = p.Run(
            app=self.app,
            command=command.command,
            connection=self.console.connection,
            env=command.env,
            size=command.size,
            attach=False,
        )
        dyno = (await link.start(run)).dyno
        self.console.write(
            f"Running `{command.command}` detached... up, {dyno.name} ({size_label(dyno.size)})\n"
            f"Use `{self.console.ssh_command()} run:logs -p {dyno.name} --tail` "
            "to view the output.\n"
        )
        self.console.exit(0)

    async def list(self, as_json: bool) -> None:
        link = await self.console.open_link()
        dynos = await link.list_dynos(self.app)
        if as_json:
            self.console.write(json.dumps([dyno_json(dyno) for dyno in dynos], indent=2) + "\n")
        else:
            self.console.write(format_ps(dynos, time.time()))
        self.console.exit(0)

    async def stop(self, dyno: str) -> None:
        link = await self.console.open_link()
        await link.stop(self.app, dyno)
        self.console.write(f"Stopping {dyno} dyno on {self.app}... done\n")
        self.console.exit(0)

    async def logs(self, command: commands.RunLogs) -> None:
        """The app log; with --tail, new lines until the client leaves (or presses Ctrl-C
        on a terminal). The client's pace sets ours: while its channel is full we stop
        reading, and the manager drops lines for us and says how many."""
        link = await self.console.open_link()
        self.console.on_interrupt(link.close)
        request = p.Logs(self.app, command.dyno, command.lines, command.tail)
        async for part in link.logs(request):
            if isinstance(part, p.LogLines):
                self.console.write("".join(f"{line}\n" for line in part.lines))
            else:
                self.console.write(
                    f"gateway: {part.count} log lines dropped (reading too slowly)\n",
                    stderr=True,
                )
            await self.console.writable()
        self.console.exit(0)
