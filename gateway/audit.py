"""The audit trail: JSON lines, one event each (connects, authentications, sessions,
stops, admin changes), appended by whichever gateway process saw the event.

No session content is written. Each event is one write to a file opened O_APPEND, so
lines from the front, the manager and the admin CLI never interleave.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


class AuditLog:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    @classmethod
    def on_descriptor(cls, fd: int) -> AuditLog:
        """The trail through a descriptor opened O_APPEND by someone allowed to (the
        front cannot open it: it is handed one, gateway/manager/front.py)."""
        audit = cls.__new__(cls)
        audit._fd = fd
        return audit

    def event(self, kind: str, **fields: Any) -> None:
        """Record one event; fields with None values are left out."""
        record = {"time": _now(), "event": kind}
        record.update((key, value) for key, value in fields.items() if value is not None)
        os.write(self._fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())

    def close(self) -> None:
        os.close(self._fd)


def _now() -> str:
    return datetime.fromtimestamp(time.time(), UTC).isoformat(timespec="milliseconds")
