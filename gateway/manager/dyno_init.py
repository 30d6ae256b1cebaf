"""The dyno's init (dyno_init.c and its parts): built once per source version, and the
channels the manager drives each dyno's init through.

The init is native because one runs beside every dyno (the benchmarks run 1,000 at
once); it is built here, from the source shipped in the package, with the host's C
compiler the first time a manager needs it, and kept in `state_dir/lib` under a name
that carries the source's digest, so an upgrade builds the new one beside the old.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import trio

from gateway.ipc import ancillary

# The init's sources, built together into one binary (dyno_init.h says which does what).
SOURCES = tuple(
    Path(__file__).with_name(name)
    for name in (
        "dyno_init.h",
        "dyno_init.c",
        "dyno_init_manager.c",
        "dyno_init_program.c",
        "dyno_init_sandbox.c",
        "dyno_init_sessions.c",
        "dyno_init_network.c",
    )
)
COMPILERS = ("cc", "gcc", "clang")
# Descriptors a dyno inherits are moved at or above this, clear of the ones the bwrap
# wrapper script uses for itself (3 and 4).
FIRST_PASSED_FD = 10


def _high(fd: int) -> int:
    """`fd` moved to a number at or above FIRST_PASSED_FD (close-on-exec, as before)."""
    if fd >= FIRST_PASSED_FD:
        return fd
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, FIRST_PASSED_FD)
    os.close(fd)
    return moved


class InitUnavailable(Exception):
    """The init cannot be built here; the message says what to install."""


@dataclass(frozen=True)
class InitBinary:
    """The built init, and a descriptor of it that sandboxes exec through
    (/proc/self/fd/N), so no sandbox needs a path to the gateway's state."""

    path: Path
    fd: int

    @classmethod
    def ensure(cls, lib_dir: Path) -> InitBinary:
        """The init for this source, built into `lib_dir` if it is not there yet."""
        digest = hashlib.sha256(b"".join(path.read_bytes() for path in SOURCES)).hexdigest()[:16]
        path = lib_dir / f"dyno-init-{digest}"
        if not path.exists():
            _build(path)
        return cls(path, _high(os.open(path, os.O_RDONLY | os.O_CLOEXEC)))


def _build(path: Path) -> None:
    compiler = next((c for c in COMPILERS if shutil.which(c)), None)
    if compiler is None:
        raise InitUnavailable(
            "dynos need a small native init (gateway/manager/dyno_init*.c) and no C "
            "compiler was found to build it (Debian: apt-get install gcc libc6-dev)"
        )
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    result = subprocess.run(
        [compiler, "-O2", "-Wall", "-o", str(partial), *(str(p) for p in SOURCES[1:])],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise InitUnavailable(f"building the dyno init failed: {result.stderr.strip()}")
    # Execute-only for others: a bwrap dyno's user runs it (through a descriptor), and
    # nobody else needs to read it.
    os.chmod(partial, 0o711)
    partial.rename(path)  # atomic: a concurrent start sees the whole binary or none


class InitError(Exception):
    """The init could not build or start the dyno; the message is its own words."""


@dataclass
class InitControl:
    """One dyno's channels to its init: commands (and the start message, with the dyno's
    stdio) go down a SEQPACKET socket, its status lines come back on a pipe ("pid N",
    "ready", "exit STATUS", "error TEXT"). The child's ends go to the spawned process and
    are closed here once it started."""

    control: socket.socket  # ours
    status: int  # ours: the read end, non-blocking
    child_control: int
    child_status: int
    closed: set[int] = field(default_factory=set)
    _said: bytes = b""

    @classmethod
    def open(cls) -> InitControl:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(status_r, False)
        child_control = _high(theirs.detach())
        return cls(ours, status_r, child_control, _high(status_w))

    @property
    def child_fds(self) -> tuple[int, int]:
        return self.child_control, self.child_status

    def init_args(self, ctty: bool) -> list[str]:
        """The init's options when it runs a program now (the program follows `--`)."""
        args = ["--ctty"] if ctty else []
        return [*args, "--control", str(self.child_control), "--status", str(self.child_status)]

    def close_child_ends(self) -> None:
        self._close(self.child_control, self.child_status)

    def send(self, command: bytes) -> None:
        """A command for the init (h, t, k); nothing if it has already ended."""
        with contextlib.suppress(OSError):
            self.control.send(command)

    def start(
        self, hostname: str, pty: bool, argv: list[str], env: dict[str, str], stdio: list[int]
    ) -> None:
        """Start a prepared dyno's command with these three descriptors as its stdio
        (the init owns its copies from here). OSError if the init is gone."""
        words = [hostname, *_program_words(pty, argv, env)]
        self.control.sendmsg([_packet(b"S", words)], ancillary(stdio))

    def enter(self, pty: bool, argv: list[str], env: dict[str, str], fds: list[int]) -> None:
        """Fork a process inside the running dyno (dyno_init_sessions.c): `fds` are its
        stdin, stdout and stderr, then its session socket, on which the init answers
        (the init owns its copies from here). OSError if the init is gone."""
        self.control.sendmsg([_packet(b"E", _program_words(pty, argv, env))], ancillary(fds))

    def connect(self, address: str, port: int, reply: int) -> None:
        """Connect to `address` (a loopback address) and `port` inside the dyno's network;
        the init answers on `reply`: "ok" with the connecting socket, or "error TEXT".
        OSError if the init is gone."""
        self.control.sendmsg([_packet(b"C", [address, str(port)])], ancillary([reply]))

    async def said(self, kind: str) -> str:
        """The value of the init's first status line of `kind` ("pid", "ready"), which it
        consumes; InitError with its own words if it says "error ..." first, or if it ends
        first. Lines of other kinds stay for later: in sandbox mode two processes write
        them (the first says "pid", PID 1 "ready"), so they may come in either order."""
        while True:
            *lines, partial = self._said.split(b"\n")
            for n, line in enumerate(lines):
                word, _, value = line.decode(errors="replace").partition(" ")
                if word == "error":
                    raise InitError(value)
                if word == kind:
                    del lines[n]
                    self._said = b"".join(rest + b"\n" for rest in lines) + partial
                    return value
            await trio.lowlevel.wait_readable(self.status)
            try:
                chunk = os.read(self.status, 4096)
            except BlockingIOError:
                continue
            if not chunk:
                raise InitError(f"ended before it said {kind!r}")
            self._said += chunk

    def main_status(self) -> int | None:
        """The command's wait status, once the init has ended and said it; None if it
        never did (the init was killed)."""
        data = self._said
        with contextlib.suppress(OSError):
            while chunk := os.read(self.status, 4096):
                data += chunk
        self._said = data
        for line in data.decode(errors="replace").splitlines():
            kind, _, value = line.partition(" ")
            if kind == "exit" and value.isdigit():
                return int(value)
        return None

    def close(self) -> None:
        self.control.close()
        self._close(self.status, self.child_control, self.child_status)

    def _close(self, *fds: int) -> None:
        for fd in fds:
            if fd not in self.closed:
                self.closed.add(fd)
                os.close(fd)


def _program_words(pty: bool, argv: list[str], env: dict[str, str]) -> list[str]:
    words = ["pty" if pty else "pipes", str(len(argv)), *argv]
    return words + [f"{key}={value}" for key, value in env.items()]


def _packet(kind: bytes, words: list[str]) -> bytes:
    """A control packet: its kind, then NUL-terminated words."""
    return kind + b"".join(os.fsencode(word) + b"\0" for word in words)
