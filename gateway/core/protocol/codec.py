"""One message per packet, as JSON."""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

from gateway.core.protocol.fields import (
    LocalProtocolError,
    Pty,
    RemoteProtocolError,
)
from gateway.core.protocol.messages import (
    MAX_PACKET,
    MESSAGES,
    DynoInfo,
    Message,
    Reserved,
    Started,
)


def _plain(value: Any) -> Any:
    if isinstance(value, Pty | DynoInfo):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value


def encode(message: Message) -> bytes:
    """One packet; LocalProtocolError if it would not fit one."""
    body = {f.name: _plain(getattr(message, f.name)) for f in fields(message)}
    data = json.dumps({"type": message.kind, **body}, separators=(",", ":")).encode()
    if len(data) > MAX_PACKET:
        raise LocalProtocolError(f"a {message.kind} message of {len(data)} bytes is too large")
    return data


def _build(cls: type[Message], body: dict[str, Any]) -> Message:
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in body:
            continue  # a default applies, or the constructor says what is missing
        value = body.pop(f.name)
        if f.name == "pty" and value is not None:
            if not isinstance(value, dict):
                raise LocalProtocolError("pty must be an object")
            value = Pty(**value)
        elif f.name == "dyno" and cls in (Reserved, Started):
            if not isinstance(value, dict):
                raise LocalProtocolError("dyno must be an object")
            value = DynoInfo(**value)
        elif f.name == "dynos":
            if not isinstance(value, list) or not all(isinstance(d, dict) for d in value):
                raise LocalProtocolError("dynos must be a list of objects")
            value = tuple(DynoInfo(**d) for d in value)
        elif isinstance(value, list):  # JSON's arrays are the messages' tuples
            value = tuple(value)
        kwargs[f.name] = value
    if body:
        raise LocalProtocolError(f"unknown fields {sorted(body)[:5]}")
    return cls(**kwargs)


def decode(data: bytes) -> Message:
    """The message in one packet, or RemoteProtocolError saying what is wrong with it."""
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RemoteProtocolError("not JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("type"), str):
        raise RemoteProtocolError("not a message object with a type")
    cls = MESSAGES.get(body.pop("type"))
    if cls is None:
        raise RemoteProtocolError("unknown message type")
    try:
        return _build(cls, body)
    except (LocalProtocolError, TypeError) as exc:
        raise RemoteProtocolError(f"{cls.kind}: {exc}") from None


def batches(lines: list[str], limit: int = MAX_PACKET - 1024) -> list[tuple[str, ...]]:
    """Split lines into groups whose LogLines or MetricsText fits one packet."""
    groups: list[list[str]] = [[]]
    size = 0
    for line in lines:
        cost = len(json.dumps(line)) + 1
        if groups[-1] and size + cost > limit:
            groups.append([])
            size = 0
        groups[-1].append(line)
        size += cost
    return [tuple(group) for group in groups if group]
