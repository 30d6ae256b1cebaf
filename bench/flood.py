"""Session start under a log flood (issue 12, item 7): `ssh host true` on the gateway
while it is idle, then while 8 detached dynos print as fast as they can (`yes`), whose
output the manager reads into the app log within each dyno's rate. The row's sshd
column holds the same gateway, idle: the ratio is the slowdown, held to 2x."""

from __future__ import annotations

import subprocess

from bench.latency import _ms, fresh_connections
from bench.rows import Row
from bench.servers import Gateway
from bench.util import Progress, median

SECTION = "log flood"
FLOODERS = 8


def rows(gateway: Gateway, count: int) -> list[Row]:
    idle = fresh_connections([gateway], count)["gateway"]
    progress = Progress(f"starting {FLOODERS} flooding dynos", FLOODERS)
    for _ in range(FLOODERS):
        started = subprocess.run(
            gateway.ssh_argv("run:detached 'yes flooding the app log'"),
            capture_output=True,
            timeout=60,
        )
        if started.returncode != 0:
            raise RuntimeError(f"run:detached failed: {started.stderr.decode()}")
        progress.step()
    try:
        flooded = fresh_connections([gateway], count)["gateway"]
    finally:
        for line in gateway.cli("ps", "bench").splitlines()[1:]:
            subprocess.run(
                gateway.ssh_argv(f"run:stop {line.split()[0]}"), capture_output=True, timeout=60
            )
    return [
        Row(
            SECTION,
            f"`ssh host true` with {FLOODERS} dynos flooding the log (sshd column: idle)",
            "ms",
            median(idle) * 1000,
            median(flooded) * 1000,
            goal="<= 2",
            detail={"count": count, "samples_ms": _ms({"idle": idle, "flooded": flooded})},
        )
    ]
