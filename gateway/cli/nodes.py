"""`gateway nodes`: the gateway nodes sharing this state, as their heartbeats tell."""

from __future__ import annotations

import argparse

from gateway.cli.registry import _print_json, _store, _when, command, json_arg
from gateway.config import Config


@command("nodes", "list the gateway nodes: heartbeat, dynos running, capacity", json_arg)
def nodes(args: argparse.Namespace, config: Config) -> int:
    rows = _store(config).list_nodes()
    if args.json:
        _print_json(
            [
                {
                    "name": node.name,
                    "public_host": node.public_host,
                    "state": node.state,
                    "started_at": _when(node.started_at),
                    "heartbeat_at": _when(node.heartbeat_at),
                    "seconds_since_heartbeat": round(node.silent_for, 1),
                    "dynos": node.dynos,
                    "capacity": node.capacity,
                }
                for node in rows
            ]
        )
        return 0
    table = [("NODE", "STATE", "HEARTBEAT", "DYNOS", "CAPACITY", "PUBLIC HOST")]
    table += [
        (node.name, node.state, f"{node.silent_for:.0f}s ago", str(node.dynos),
         str(node.capacity), node.public_host or "-")
        for node in rows
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0
