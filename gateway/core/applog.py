"""The app log's lines, as Heroku writes them, and the splitting of dyno output into lines.

2026-11-29T12:00:01.500000+00:00 heroku[run.1]: Starting process with command `bash`
2026-11-29T12:00:07.000000+00:00 app[run.1]: a line the detached dyno printed
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

# Longer output lines are cut into pieces of this many bytes, as Logplex cuts them.
MAX_LINE = 10_000


@dataclass(frozen=True)
class LogLine:
    at: float  # seconds since the epoch
    source: str  # "app" or "heroku"
    dyno: str  # "run.N" (or "api")
    message: str
    # Its row in the store, once read from there (a tail tells lines apart by it).
    id: int | None = field(default=None, compare=False)

    def format(self) -> str:
        stamp = datetime.fromtimestamp(self.at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")
        return f"{stamp} {self.source}[{self.dyno}]: {self.message}"


def starting(command: str) -> str:
    return f"Starting process with command `{command}`"


def state_changed(old: str, new: str) -> str:
    return f"State changed from {old} to {new}"


def exited(status: int) -> str:
    return f"Process exited with status {status}"


class LineSplitter:
    """Turns a stream of output chunks into whole lines (without their line ends).

    A PTY ends lines with CRLF, pipes with LF: both are taken, and a line with no end yet
    waits for the next chunk or for `flush` at EOF."""

    def __init__(self) -> None:
        self._partial = bytearray()

    def feed(self, data: bytes) -> list[str]:
        *complete, rest = (bytes(self._partial) + data).split(b"\n")
        lines = [piece for line in complete for piece in self._pieces(line)]
        self._partial = bytearray(rest)
        while len(self._partial) >= MAX_LINE:
            lines.append(self._decode(bytes(self._partial[:MAX_LINE])))
            del self._partial[:MAX_LINE]
        return lines

    def flush(self) -> list[str]:
        rest, self._partial = bytes(self._partial), bytearray()
        return self._pieces(rest) if rest.rstrip(b"\r") else []

    def _pieces(self, line: bytes) -> list[str]:
        line = line.rstrip(b"\r")
        return [self._decode(line[i : i + MAX_LINE]) for i in range(0, max(len(line), 1), MAX_LINE)]

    @staticmethod
    def _decode(data: bytes) -> str:
        return data.decode("utf-8", errors="replace")
