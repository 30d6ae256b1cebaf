"""A client that uploads faster than the dyno reads must not make the gateway hold it all."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

from tests.conftest import Gateway

MB = 1024 * 1024


def gateway_pids(gateway: Gateway) -> list[int]:
    """The serve process (the manager) and its children (the SSH front)."""
    assert gateway.process is not None
    pid = gateway.process.pid
    children = [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]
    return [pid, *children]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_500mb_into_a_sleeping_dyno_arrive_whole_in_bounded_memory(gateway: Gateway) -> None:
    app = gateway.new_app()
    pids = gateway_pids(gateway)
    assert len(pids) == 2, "expected the manager and the front"
    peak = [sum(rss_bytes(pid) for pid in pids)]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            peak[0] = max(peak[0], sum(rss_bytes(pid) for pid in pids))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        producer = subprocess.Popen(
            ["head", "-c", str(500 * MB), "/dev/zero"], stdout=subprocess.PIPE
        )
        result = subprocess.run(
            gateway.ssh_argv(app, "sleep 20; cat | wc -c"),
            stdin=producer.stdout,
            capture_output=True,
            timeout=240,
        )
        producer.wait()
    finally:
        done.set()
        sampler.join()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(500 * MB).encode()
    print(f"peak {peak[0] / MB:.1f} MB")
    assert peak[0] < 150 * MB, f"gateway held {peak[0] / MB:.0f} MB"
