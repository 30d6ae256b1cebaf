"""The subset of Heroku's Platform API that the heroku CLI uses for one-off dynos:
routes, request checks, and response bodies. Pure: the HTTP server lives in the front.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

from gateway.core.commands import inside, iso_time, size_label
from gateway.core.names import InvalidName, check_config_key
from gateway.core.protocol import DynoInfo
from gateway.core.rendezvous import strip_exit_suffix

# Stable ids for things the gateway names but Heroku gives UUIDs.
_NAMESPACE = uuid.UUID("6f1c7a52-3a8e-4d0e-9a54-5c1b8b9e2d10")

ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("GET", re.compile(r"/account"), "account"),
    ("GET", re.compile(r"/apps/(?P<app>[^/]+)"), "app"),
    ("POST", re.compile(r"/apps/(?P<app>[^/]+)/dynos"), "create_dyno"),
    ("GET", re.compile(r"/apps/(?P<app>[^/]+)/dynos"), "list_dynos"),
    ("GET", re.compile(r"/apps/(?P<app>[^/]+)/dynos/(?P<dyno>[^/]+)"), "get_dyno"),
    ("POST", re.compile(r"/apps/(?P<app>[^/]+)/dynos/(?P<dyno>[^/]+)/actions/stop"), "stop_dyno"),
    ("POST", re.compile(r"/apps/(?P<app>[^/]+)/log-sessions"), "create_log_session"),
    ("GET", re.compile(r"/log-sessions/(?P<secret>[A-Za-z0-9_-]+)"), "log_stream"),
]


class APIError(Exception):
    """An error answered in Heroku's form: {"id": ..., "message": ...}."""

    def __init__(self, status: int, id: str, message: str) -> None:
        super().__init__(message)
        self.status, self.id, self.message = status, id, message

    def body(self) -> dict[str, str]:
        return {"id": self.id, "message": self.message}


def unauthorized() -> APIError:
    return APIError(401, "unauthorized", "Invalid credentials provided.")


def app_not_found() -> APIError:
    return APIError(404, "not_found", "Couldn't find that app.")


def dyno_not_found() -> APIError:
    return APIError(404, "not_found", "Couldn't find that process.")


def route(method: str, path: str) -> tuple[str, dict[str, str]]:
    """The handler name and path parameters for a request, or APIError 404/405."""
    path = path.split("?", 1)[0].rstrip("/") or "/"
    allowed = False
    for route_method, pattern, name in ROUTES:
        match = pattern.fullmatch(path)
        if match:
            if route_method == method:
                return name, match.groupdict()
            allowed = True
    if allowed:
        raise APIError(405, "method_not_allowed", f"{method} is not allowed on {path}")
    raise APIError(404, "not_found", "The requested API endpoint was not found.")


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def stable_id(*parts: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, "/".join(parts)))


def account_body(account_id: str) -> dict[str, Any]:
    return {
        "id": account_id,
        "email": "gateway@localhost",
        "name": "dyno gateway",
        "verified": True,
        "two_factor_authentication": False,
        "created_at": iso_time(0),
        "updated_at": iso_time(0),
    }


def app_body(name: str, created_at: float, account_id: str) -> dict[str, Any]:
    # A stack other than `cnb`, or the CLI prefixes every command with `launcher`.
    stack = {"id": stable_id("stack", "heroku-24"), "name": "heroku-24"}
    return {
        "id": stable_id("app", name),
        "name": name,
        "stack": stack,
        "build_stack": stack,
        "generation": {"id": stable_id("generation", "cedar"), "name": "cedar"},
        "owner": {"id": account_id, "email": "gateway@localhost"},
        "process_tier": "production",
        "region": {"id": stable_id("region", "local"), "name": "local"},
        "maintenance": False,
        "created_at": iso_time(created_at),
        "updated_at": iso_time(created_at),
        "released_at": iso_time(created_at),
        "organization": None,
        "team": None,
        "space": None,
        "web_url": None,
        "git_url": None,
    }


def dyno_body(
    app: str, row: DynoInfo, attach_url: str | None = None, listing: bool = False
) -> dict[str, Any]:
    """A dyno as the API shows it. In a `listing` (what `heroku ps` prints), the command
    says what else is inside the dyno (`bash (1 session)`): the CLI prints no other field
    of a one-off dyno; `sessions` and `forwarded_connections` say it for scripts."""
    return {
        "id": stable_id("dyno", app, row.name, str(row.created_at)),
        "name": row.name,
        "type": "run",
        "state": row.state,
        "command": row.command + (inside(row) if listing else ""),
        "sessions": row.sessions,
        "forwarded_connections": row.forwards,
        "size": size_label(row.size),
        "attach_url": attach_url,
        "created_at": iso_time(row.created_at),
        "updated_at": iso_time(row.since),
        "release": {
            "id": stable_id("release", app, str(row.release_version)),
            "version": row.release_version,
        },
        "app": {"id": stable_id("app", app), "name": app},
    }


@dataclass(frozen=True)
class DynoCreate:
    command: str
    attach: bool
    env: dict[str, str]
    size: str | None
    terminal: tuple[str, int, int] | None  # TERM, columns, lines


def parse_dyno_create(body: Any) -> DynoCreate:
    """Check a POST /apps/APP/dynos body as the CLI sends it. COLUMNS and LINES come as
    numbers although the API schema says strings: both are taken."""
    if not isinstance(body, dict):
        raise APIError(422, "invalid_params", "The request body must be a JSON object.")
    command = body.get("command")
    if not isinstance(command, str) or not command.strip():
        raise APIError(422, "invalid_params", "command is required.")
    attach = body.get("attach", False)
    force_no_tty = body.get("force_no_tty") or False
    if not isinstance(attach, bool) or not isinstance(force_no_tty, bool):
        raise APIError(422, "invalid_params", "attach and force_no_tty must be booleans.")
    size = body.get("size")
    if size is not None and not isinstance(size, str):
        raise APIError(422, "invalid_params", "size must be a string.")
    raw_env = body.get("env")
    raw_env = {} if raw_env is None else raw_env
    if not isinstance(raw_env, dict):
        raise APIError(422, "invalid_params", "env must be an object.")
    env: dict[str, str] = {}
    for key, value in raw_env.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise APIError(422, "invalid_params", f"env value of {key} must be a string.")
        try:
            env[check_config_key(str(key))] = str(value)
        except InvalidName as exc:
            raise APIError(422, "invalid_params", str(exc)) from None
    terminal = None
    if attach and not force_no_tty:
        terminal = (
            env.get("TERM") or "xterm",
            _dimension(env, "COLUMNS", 80),
            _dimension(env, "LINES", 24),
        )
    return DynoCreate(
        command=strip_exit_suffix(command),
        attach=attach,
        env=env,
        size=size.lower() if size else None,
        terminal=terminal,
    )


def _dimension(env: dict[str, str], key: str, default: int) -> int:
    value = env.get(key, "")
    return int(value) if value.isdigit() and 0 < int(value) <= 10000 else default


@dataclass(frozen=True)
class LogSessionRequest:
    dyno: str | None
    lines: int
    tail: bool


def parse_log_session(body: Any) -> LogSessionRequest:
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise APIError(422, "invalid_params", "The request body must be a JSON object.")
    dyno, lines, tail = body.get("dyno"), body.get("lines", 100), body.get("tail", False)
    if dyno is not None and not isinstance(dyno, str):
        raise APIError(422, "invalid_params", "dyno must be a string.")
    if lines is None:
        lines = 100
    if isinstance(lines, bool) or not isinstance(lines, int) or not 0 <= lines <= 1500:
        raise APIError(422, "invalid_params", "lines must be a number from 0 to 1500.")
    if tail is None:
        tail = False
    if not isinstance(tail, bool):
        raise APIError(422, "invalid_params", "tail must be a boolean.")
    return LogSessionRequest(dyno=dyno or None, lines=lines, tail=tail)


def sse_event(line: str) -> bytes:
    """One log line as a Server-Sent Event (lines hold no newlines)."""
    return f"data: {line}\n\n".encode()
