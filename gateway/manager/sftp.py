"""The sftp subsystem: sftp-server, run inside a dyno as the dyno's user (so every file
operation is the dyno's own), and its log turned into audit events.

sftp-server logs each file it closes with the bytes read and written, and each change
(remove, rename, mkdir, ...), on its stderr at `-l INFO`; the manager keeps that stderr
(the client never sees it) and writes one audit event per line that says something
happened to a file (gateway/core/dyno_access.py parses them).
"""

from __future__ import annotations

import os
import shlex

from gateway.audit import AuditLog
from gateway.config import Config
from gateway.core.dyno_access import FileTransfer, parse_sftp_log
from gateway.eventlog import EventLog
from gateway.manager.stdio import read_lines

# The name a session running the subsystem has in records (run:list, the app log).
SHOWN = {"sftp": "sftp-server"}
# After its client left, how long sftp-server has to see the end of its input and log
# the files it had open, before it is hung up.
SUBSYSTEM_GRACE = 5.0


# sftp-server's lines that neither change a file nor say something went wrong.
_ROUTINE = ("open ", "opendir ", "closedir ", "sent status ", "session opened ", "session closed ")


class SubsystemUnavailable(Exception):
    """The operator turned the subsystem off; the message says so."""


def subsystem_command(config: Config, subsystem: str) -> str:
    """The shell command that runs `subsystem` in a dyno, as sshd runs a subsystem
    through the user's shell: sftp-server, logging to stderr, starting in $HOME (the
    app's dir; sftp-server's own default is the passwd entry's home)."""
    server = config.dynos.sftp_server
    if subsystem != "sftp" or not server:
        raise SubsystemUnavailable(f"the {subsystem} subsystem is turned off on this gateway")
    if not os.access(server, os.X_OK):  # dynos see the host's /usr (the stack)
        raise SubsystemUnavailable(f"sftp is not available on this gateway: {missing(server)}")
    return f'exec {shlex.quote(server)} -e -l INFO -d "$HOME"'


def missing(server: str) -> str:
    return f"{server} is not installed (Debian: apt-get install openssh-sftp-server)"


async def audit_sftp_log(fd: int, audit: AuditLog, log: EventLog, **where: str) -> None:
    """Read sftp-server's log from `fd` until EOF: an audit event per file transferred
    or changed (`where`: app, dyno and conn), the other lines to the manager's log."""

    def take(lines: list[str]) -> None:
        for line in lines:
            event = parse_sftp_log(line)
            if isinstance(event, FileTransfer):
                audit.event(
                    "file_transfer", **where, path=event.path,
                    bytes_read=event.bytes_read, bytes_written=event.bytes_written,
                )  # fmt: skip
            elif event is not None:
                audit.event("file_change", **where, op=event.op, path=event.path, to=event.to)
            elif line and not line.startswith(_ROUTINE):
                log.info("sftp-server said %r", line[:300])

    await read_lines(fd, take)
