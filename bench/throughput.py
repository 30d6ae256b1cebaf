"""Throughput with the OpenSSH client: down (`head -c N /dev/zero` read to /dev/null) and
up (`cat > /dev/null` on the server), per cipher.

Each transfer is one `ssh` command, so its time includes connecting; that server's median
`ssh -c CIPHER host true` is subtracted (at most half the time), leaving the transfer.
A server that does not offer a cipher gets no number for it, and the row says so.
"""

from __future__ import annotations

import subprocess
import time

from bench.report import negotiated
from bench.rows import Row
from bench.servers import Server
from bench.util import MB, Progress, median

SECTION = "throughput"
# None: no -c, whatever the client and that server agree on (what users get).
CIPHERS = ("chacha20-poly1305@openssh.com", "aes128-gcm@openssh.com", None)
DIRECTIONS = ("down", "up")
GOAL = ">= 1"  # issue 15: at least sshd's throughput


def transfer(server: Server, direction: str, cipher: str | None, size: int) -> float:
    """Seconds for one `ssh` moving `size` bytes of zeros in `direction`."""
    if direction == "down":
        argv = server.ssh_argv(f"head -c {size} /dev/zero", cipher=cipher)
        started = time.perf_counter()
        result = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    else:
        argv = server.ssh_argv("cat > /dev/null", cipher=cipher)
        started = time.perf_counter()
        with subprocess.Popen(
            ["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE
        ) as src:
            result = subprocess.run(
                argv, stdin=src.stdout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{server.name}: {direction} with {cipher} failed: {result.stderr!r}")
    return elapsed


def connect_time(server: Server, cipher: str | None, count: int = 3) -> float | None:
    """Median seconds of `ssh -c CIPHER host true`, the part of a transfer that is not
    one; None if the server does not offer the cipher."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        result = subprocess.run(server.ssh_argv("true", cipher=cipher), capture_output=True)
        if result.returncode != 0:
            return None
        times.append(time.perf_counter() - started)
    return median(times)


def _label(cipher: str | None, servers: list[Server]) -> str:
    if cipher:
        return cipher.split("@")[0]
    agreed = (negotiated(s.ssh_argv("true")).split("cipher ")[-1] for s in servers)
    names = " / ".join(c.split("@")[0] for c in agreed)
    return f"default ({names})"


def rows(servers: list[Server], size: int, reps: int) -> list[Row]:
    """MB/s per direction and cipher, the median of `reps` transfers, servers alternating."""
    total = len(DIRECTIONS) * len(CIPHERS) * reps * len(servers)
    progress = Progress(f"throughput, {size // MB} MB transfers", total)
    result = []
    for cipher in CIPHERS:
        setup = {s.name: connect_time(s, cipher) for s in servers}
        offered = [s for s in servers if setup[s.name] is not None]
        label = _label(cipher, servers)
        for direction in DIRECTIONS:
            rates: dict[str, list[float]] = {s.name: [] for s in servers}
            for _ in range(reps):
                for server in offered:
                    elapsed = transfer(server, direction, cipher, size)
                    # Small transfers (--quick) are mostly set-up: never subtract over half.
                    seconds = max(elapsed - (setup[server.name] or 0), elapsed / 2)
                    rates[server.name].append(size / MB / max(seconds, 1e-6))
                progress.step(len(servers))
            missing = [s.name for s in servers if s not in offered]
            result.append(
                Row(
                    SECTION,
                    f"{direction}, {label}",
                    "MB/s",
                    median(rates["sshd"]),
                    median(rates["gateway"]),
                    higher_is_better=True,
                    goal=GOAL,
                    note=f"not offered by {', '.join(missing)}" if missing else "",
                    detail={
                        "cipher": cipher or "default",
                        "size_bytes": size,
                        "reps": reps,
                        "setup_s": setup,
                        "samples_mb_s": {k: [round(v, 1) for v in r] for k, r in rates.items()},
                    },
                )
            )
    return result
