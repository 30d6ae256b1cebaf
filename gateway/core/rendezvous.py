"""The rendezvous handshake (port 5000), as the heroku CLI speaks it.

The client opens TLS and writes the attach URL's path without its leading slash (and any
query string), then CRLF. The server answers `rendezvous\\r\\n` in a write of its own;
after that, raw bytes both ways.
"""

from __future__ import annotations

import re

GREETING = b"rendezvous\r\n"
MAX_LINE = 256  # a secret line is ~50 bytes; anything much longer is not a client of ours

_SECRET = re.compile(rb"[A-Za-z0-9_-]{16,128}")


class BadHandshake(ValueError):
    pass


def read_secret(buffer: bytes) -> tuple[str, bytes] | None:
    """The secret from the first line in `buffer` and the bytes after it, or None while
    the line is incomplete. A line that cannot be a secret raises BadHandshake."""
    end = buffer.find(b"\r\n")
    if end < 0:
        if len(buffer) > MAX_LINE:
            raise BadHandshake("no secret line within the first bytes")
        return None
    line = buffer[:end].split(b"?", 1)[0]
    if not _SECRET.fullmatch(line):
        raise BadHandshake("malformed secret line")
    return line.decode(), buffer[end + 2 :]


def exit_marker(status: int) -> bytes:
    """What the CLI looks for to end `heroku run` with the dyno's status."""
    return f"\uffff heroku-command-exit-status: {status}\n".encode()


# The CLI's --exit-code appends this to the command; the gateway strips it and sends the
# true status itself, so `exit 3` (which would end the shell before the echo) still works.
_CLI_SUFFIX = re.compile(r'\s*;\s*echo "\uffff heroku-command-exit-status: \$\?"\s*$')


def strip_exit_suffix(command: str) -> str:
    return _CLI_SUFFIX.sub("", command)
