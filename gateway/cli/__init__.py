"""The `gateway` command: local administration, `serve` and `demo`.

Each subject has a module; importing them registers their commands.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway import config as config_module
from gateway.cli import admin, dynos, nodes, serving, usage_prune  # noqa: F401 (they register commands)
from gateway.cli.registry import COMMANDS, Handler, UserError
from gateway.config import ConfigError
from gateway.core.names import InvalidName
from gateway.modes import private_umask
from gateway.store import StoreError, StoreUnavailable


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway", description="SSH gateway for one-off dynos (what `heroku run` gives)."
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="TOML settings file (default: $GATEWAY_CONFIG, else the built-in defaults, "
        "with state and keys under $GATEWAY_HOME or the checkout; gateway check says where)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (handler, help_text, add_arguments) in COMMANDS.items():
        if help_text == argparse.SUPPRESS:  # hidden from the list of commands
            sp = sub.add_parser(name, description=help_text)
        else:
            sp = sub.add_parser(name, description=help_text, help=help_text)
        add_arguments(sp)
        sp.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Before anything is written: state, keys and logs are the gateway's user's alone.
    private_umask()
    args = build_parser().parse_args(argv)
    try:
        config = config_module.load(args.config)
        if getattr(args, "port_base", None) is not None:
            config = config_module.with_port_base(config, args.port_base)
        handler: Handler = args.handler
        return handler(args, config)
    except (UserError, ConfigError, StoreError, StoreUnavailable, InvalidName) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
