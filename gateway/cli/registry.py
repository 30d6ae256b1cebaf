"""The command registry and what every command shares: errors for the user, the store,
the audit trail, JSON output, the running manager."""

from __future__ import annotations

import argparse
import getpass
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from gateway.audit import AuditLog
from gateway.config import Config
from gateway.core.protocol import Message
from gateway.ipc import ManagerError
from gateway.manager_client import request
from gateway.store import Store, open_store

Handler = Callable[[argparse.Namespace, Config], int]
COMMANDS: dict[str, tuple[Handler, str, Callable[[argparse.ArgumentParser], None]]] = {}


class UserError(Exception):
    """A mistake the user can fix; printed as `gateway: MESSAGE`, exit status 1."""


def command(
    name: str, help: str, *args: Callable[[argparse.ArgumentParser], object]
) -> Callable[[Handler], Handler]:
    """Register `handler` as the subcommand `name`, its arguments added by `args`."""

    def register(handler: Handler) -> Handler:
        def add_arguments(parser: argparse.ArgumentParser) -> None:
            for add in args:
                add(parser)

        COMMANDS[name] = (handler, help, add_arguments)
        return handler

    return register


def app_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("app", help="the app's name")


def json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def _store(config: Config) -> Store:
    return open_store(config)


def _audit(config: Config, kind: str, **fields: Any) -> None:
    """An admin change, in the audit trail (who: the local user running the command)."""
    AuditLog(config.audit_path).event(kind, by=getpass.getuser(), **fields)


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _manager(config: Config, message: Message) -> Iterator[Message]:
    """The running gateway's replies to one request; its refusals become UserErrors."""
    try:
        yield from request(config.manager_socket, message)
    except ManagerError as exc:
        raise UserError(str(exc)) from None
