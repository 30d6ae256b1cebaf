"""Log lines that carry what they belong to, the same in every process, without each call
site spelling the fields out. A line is `EVENT WORDS key=value...`: the bound fields
(`app=`, `dyno=`, `conn=`) go right after the event's words, before its own fields, so
`grep 'dyno up app=shop'` finds what it always found."""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from typing import Any


class EventLog(logging.LoggerAdapter[logging.Logger]):
    """A logger bound to context fields: `log.info("dyno up pid=%d", pid)` writes
    `dyno up app=shop dyno=run.3 conn=1f.7 pid=42`."""

    def __init__(self, logger: logging.Logger, **fields: object) -> None:
        super().__init__(logger, {k: v for k, v in fields.items() if v is not None})

    def bind(self, **fields: object) -> EventLog:
        """The same logger with more (or changed) context."""
        assert self.extra is not None
        return EventLog(self.logger, **{**self.extra, **fields})

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        return with_fields(str(msg), self.extra or {}), kwargs


def with_fields(message: str, fields: Mapping[str, object]) -> str:
    """`message` with `fields` inserted after its event words (those before the first
    word holding `=`)."""
    words = message.split(" ")
    at = next((i for i, word in enumerate(words) if "=" in word), len(words))
    context = [f"{key}={value}" for key, value in fields.items()]
    return " ".join([*words[:at], *context, *words[at:]])


def event_log(name: str, **fields: object) -> EventLog:
    return EventLog(logging.getLogger(name), **fields)
