"""Commands about running dynos: the app log, ps, ps:stop, sizes, usage."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, replace
from datetime import UTC, datetime

from gateway.cli.registry import (
    UserError,
    _audit,
    _manager,
    _print_json,
    _store,
    app_arg,
    command,
    json_arg,
)
from gateway.config import Config
from gateway.core import sizes
from gateway.core.commands import dyno_json, format_ps
from gateway.core.protocol import Dropped, LogLines, Logs, Stop
from gateway.core.terminal import escape_controls


def _shown(text: str) -> str:
    """Text from a dyno as this command prints it: escaped on a terminal, raw when
    piped (gateway/core/terminal.py)."""
    return escape_controls(text) if sys.stdout.isatty() else text


# -- the app log -----------------------------------------------------------------------


@command(
    "logs",
    "show the app log (Heroku's line format); --tail follows it",
    app_arg,
    lambda p: p.add_argument("-p", "--dyno", help="only this dyno's lines (run.N)"),
    lambda p: p.add_argument("-n", "--num", type=int, default=100, help="how many lines"),
    lambda p: p.add_argument("-t", "--tail", action="store_true", help="follow new lines"),
)
def logs(args: argparse.Namespace, config: Config) -> int:
    if not args.tail:
        for logged in _store(config).read_log(args.app, dyno=args.dyno, lines=args.num):
            print(_shown(logged.format()))
        return 0
    for message in _manager(config, Logs(args.app, args.dyno, args.num, tail=True)):
        if isinstance(message, LogLines):
            for line in message.lines:
                print(_shown(line), flush=True)
        elif isinstance(message, Dropped):
            print(f"gateway: {message.count} log lines dropped", file=sys.stderr)
    return 0


# -- dynos -----------------------------------------------------------------------------


@command("ps", "list an app's running one-off dynos", app_arg, json_arg)
def ps(args: argparse.Namespace, config: Config) -> int:
    rows = [dyno.info() for dyno in _store(config).list_dynos(args.app, running=True)]
    if args.json:
        _print_json([dyno_json(row) for row in rows])
    else:
        shown = [replace(row, command=_shown(row.command)) for row in rows]
        print(format_ps(shown, time.time()), end="")
    return 0


@command(
    "ps:stop",
    "stop a dyno: SIGTERM, stop_grace, SIGKILL",
    app_arg,
    lambda p: p.add_argument("dyno", help="run.N"),
)
def ps_stop(args: argparse.Namespace, config: Config) -> int:
    for _ in _manager(config, Stop(args.app, args.dyno)):
        print(f"Stopping {args.dyno} dyno on {args.app}... done")
    return 0


@command(
    "apps:update",
    "change an app's default dyno size, or the largest it may use",
    app_arg,
    lambda p: p.add_argument("--size", help="the size its dynos get unless a run asks"),
    lambda p: p.add_argument(
        "--max-size", help='the largest size a run may ask for ("" for [dynos] max_size)'
    ),
)
def apps_update(args: argparse.Namespace, config: Config) -> int:
    if args.size is None and args.max_size is None:
        raise UserError("say what to change: --size SIZE, --max-size SIZE, or both")
    for given in (args.size, args.max_size or None):
        if given is not None and given not in config.sizes:
            raise UserError(f"unknown dyno size {given!r}: choose one of {', '.join(config.sizes)}")
    store = _store(config)
    app = store.app(args.app)
    size = args.size or app.size
    cap = (args.max_size if args.max_size is not None else app.max_size) or config.dynos.max_size
    if (why := sizes.refusal(config.sizes, size, cap, app.name)) is not None:
        raise UserError(f"{size} as the default: {why}")
    store.set_app_size(args.app, args.size, args.max_size)
    _audit(config, "app_updated", app=args.app, size=args.size, max_size=args.max_size)
    print(f"{args.app} runs {size} dynos by default, and at most {cap or 'any size'}")
    return 0


@command(
    "usage",
    "dyno-seconds of ended dynos, per app and size",
    lambda p: p.add_argument("app", nargs="?", help="only this app"),
    lambda p: p.add_argument("--since", help="only dynos started on or after DATE (YYYY-MM-DD)"),
    json_arg,
)
def usage(args: argparse.Namespace, config: Config) -> int:
    since = 0.0
    if args.since:
        try:
            since = datetime.fromisoformat(args.since).replace(tzinfo=UTC).timestamp()
        except ValueError:
            raise UserError(
                f"--since takes a date such as 2026-11-01, not {args.since!r}"
            ) from None
    rows = _store(config).usage(args.app, since)
    if args.json:
        _print_json([asdict(row) for row in rows])
        return 0
    for row in rows:
        print(f"{row.app}  {row.size}  {row.dynos} dynos  {row.seconds:.0f} dyno-seconds")
    return 0
