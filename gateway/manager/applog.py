"""Writing the app log: dyno lifecycle lines and the output of detached dynos."""

from __future__ import annotations

import time

from gateway.core.applog import LogLine
from gateway.store import Store


class AppLog:
    def __init__(self, store: Store, lines_per_app: int) -> None:
        self.store = store
        self.keep = lines_per_app

    def heroku(self, app: str, dyno: str, *messages: str) -> None:
        """Lines from the platform about a dyno (`heroku[run.N]: ...`)."""
        now = time.time()
        self.store.append_log(app, [LogLine(now, "heroku", dyno, m) for m in messages], self.keep)

    def output(self, app: str, dyno: str, lines: list[str]) -> None:
        """Lines a dyno printed (`app[run.N]: ...`)."""
        now = time.time()
        self.store.append_log(app, [LogLine(now, "app", dyno, m) for m in lines], self.keep)
