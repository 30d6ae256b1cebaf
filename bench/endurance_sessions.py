"""The endurance run's sessions: real OpenSSH clients, through ControlMaster connections
(one per worker, as a busy user's `ssh` config has it) and on fresh connections, in a
fixed mix of exec, PTY, detached and dropped (the client killed with SIGKILL while its
dyno runs)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.servers import Gateway

# One cycle of the mix: every `len(MIX)` sessions run each of these once.
MIX = (
    "exec",  # `echo N` on a ControlMaster connection: pipes
    "pty",  # `-tt`, `echo N; exit 3`: a PTY and an exit status
    "exec",
    "exec fresh",  # `echo N` on a connection of its own
    "detached",  # `run:detached echo N`
    "exec",
    "dropped",  # `echo up; sleep 100` through the master; its client killed once up
    "pty",
    "stdin",  # 64 KB up to `cat` and back, through the master
    "dropped fresh",  # the same on a connection of its own
)
TIMEOUT = 60  # seconds any one client may take
STDIN_BYTES = 65536


@dataclass(frozen=True)
class Result:
    kind: str
    seconds: float  # the client's run (for a dropped one: until its dyno said "up")
    error: str = ""  # what went wrong, if anything


class Mix:
    """Runs numbered sessions against `gateway`'s app, `workers` at a time; worker w
    always uses master connection w."""

    def __init__(self, gateway: Gateway, control_dir: Path, workers: int) -> None:
        self.gateway = gateway
        self.control_dir = control_dir
        self.workers = workers
        control_dir.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()

    def run(self, first: int, count: int, done: Callable[[], None]) -> list[Result]:
        """Sessions first..first+count-1; `done()` after each."""

        def one(number: int) -> Result:
            result = self.session(number)
            done()
            return result

        ids = iter(range(self.workers))
        lock = threading.Lock()

        def name_worker() -> None:
            with lock:
                self._local.worker = next(ids)

        pool = ThreadPoolExecutor(self.workers, initializer=name_worker)
        try:
            return list(pool.map(one, range(first, first + count)))
        finally:
            # Interrupted (Ctrl-C): the sessions not yet begun never are.
            pool.shutdown(cancel_futures=True)

    def session(self, number: int, kind: str | None = None) -> Result:
        """Session `number`: of the mix's kind for it, or of `kind`."""
        kind = kind or MIX[number % len(MIX)]
        started = time.perf_counter()
        try:
            error = self._run(kind, number, getattr(self._local, "worker", 0))
        except (OSError, subprocess.SubprocessError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        return Result(kind, time.perf_counter() - started, error)

    def probe(self, count: int) -> list[Result]:
        """`count` exec sessions one after another through the first master connection:
        the same measurement at every checkpoint, on a gateway with nothing else to do."""
        return [self.session(-1 - n, "exec") for n in range(count)]

    def close(self) -> None:
        """End the master connections."""
        for worker in range(self.workers):
            subprocess.run([*self._shared(worker), "-O", "exit", self._destination()],
                           capture_output=True, timeout=TIMEOUT)  # fmt: skip

    # -- the kinds ---------------------------------------------------------------------

    def _run(self, kind: str, number: int, worker: int) -> str:
        shared = self._shared(worker)
        fresh = self.gateway.ssh_argv("")[:-2]  # the options, without destination and command
        if kind in ("exec", "exec fresh"):
            options = shared if kind == "exec" else fresh
            return _expect(_client([*options, self._destination(), f"echo {number}"]),
                           0, f"{number}\n".encode())  # fmt: skip
        if kind == "pty":
            argv = [*shared, "-tt", self._destination(), f"echo {number}; exit 3"]
            return _expect(_client(argv), 3, f"{number}\r\n".encode())
        if kind == "detached":
            started = _client([*shared, self._destination(), "run:detached", f"echo {number}"])
            return _expect(started, 0, None)
        if kind == "stdin":
            data = os.urandom(STDIN_BYTES)
            return _expect(_client([*shared, self._destination(), "cat"], data), 0, data)
        options = shared if kind == "dropped" else fresh
        return _dropped([*options, self._destination(), "echo up; sleep 100"])

    def _shared(self, worker: int) -> list[str]:
        return [*self.gateway.ssh_argv("")[:-2], "-o", "ControlMaster=auto",
                "-o", f"ControlPath={self.control_dir / f'cm{worker}'}",
                "-o", "ControlPersist=yes"]  # fmt: skip

    def _destination(self) -> str:
        return f"{self.gateway.user}@127.0.0.1"


def _client(argv: list[str], data: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, input=data, capture_output=True, timeout=TIMEOUT)


def _expect(result: subprocess.CompletedProcess[bytes], status: int, output: bytes | None) -> str:
    if result.returncode != status:
        return f"exit status {result.returncode}: {result.stderr.decode(errors='replace')[-200:]}"
    if output is not None and result.stdout != output:
        return f"output {result.stdout[:60]!r}, not {output[:60]!r}"
    return ""


def _dropped(argv: list[str]) -> str:
    """Start a session, wait until its dyno prints, kill the client with SIGKILL."""
    client = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)  # fmt: skip
    assert client.stdout is not None and client.stdin is not None
    timer = threading.Timer(TIMEOUT, client.kill)  # a client that never says up
    timer.start()
    try:
        line = client.stdout.readline()
    finally:
        timer.cancel()
        client.kill()
        client.wait()
        for stream in (client.stdin, client.stdout, client.stderr):
            if stream is not None:
                stream.close()
    return "" if line == b"up\n" else f"no 'up' before the client ended: {line!r}"
