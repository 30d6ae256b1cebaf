"""The dyno's init (dyno_init.c): built once per source version, and the pipes the manager
drives each dyno's init through.

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
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

SOURCE = Path(__file__).with_name("dyno_init.c")
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
        source = SOURCE.read_bytes()
        digest = hashlib.sha256(source).hexdigest()[:16]
        path = lib_dir / f"dyno-init-{digest}"
        if not path.exists():
            _build(path)
        return cls(path, _high(os.open(path, os.O_RDONLY | os.O_CLOEXEC)))


def _build(path: Path) -> None:
    compiler = next((c for c in COMPILERS if shutil.which(c)), None)
    if compiler is None:
        raise InitUnavailable(
            "dynos need a small native init (gateway/manager/dyno_init.c) and no C "
            "compiler was found to build it (Debian: apt-get install gcc libc6-dev)"
        )
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    result = subprocess.run(
        [compiler, "-O2", "-Wall", "-o", str(partial), str(SOURCE)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise InitUnavailable(f"building the dyno init failed: {result.stderr.strip()}")
    os.chmod(partial, 0o755)
    partial.rename(path)  # atomic: a concurrent start sees the whole binary or none


@dataclass
class InitPipes:
    """One dyno's pipes to its init: commands go down `control`, the command's wait
    status comes back on `status`. The child's ends go to the spawned process and are
    closed here once it started."""

    control: int  # ours: the write end
    status: int  # ours: the read end
    child_control: int
    child_status: int
    closed: set[int] = field(default_factory=set)

    @classmethod
    def open(cls) -> InitPipes:
        control_r, control_w = os.pipe2(os.O_CLOEXEC)
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        control_r, status_w = _high(control_r), _high(status_w)
        os.set_blocking(control_w, False)
        os.set_blocking(status_r, False)
        return cls(control_w, status_r, control_r, status_w)

    @property
    def child_fds(self) -> tuple[int, int]:
        return self.child_control, self.child_status

    def init_args(self, ctty: bool) -> list[str]:
        """The init's options (the program follows `--`)."""
        args = ["--ctty"] if ctty else []
        return [*args, "--control", str(self.child_control), "--status", str(self.child_status)]

    def close_child_ends(self) -> None:
        self._close(self.child_control, self.child_status)

    def send(self, command: bytes) -> None:
        """A command for the init (h, t, k); nothing if it has already ended."""
        with contextlib.suppress(OSError):
            os.write(self.control, command)

    def main_status(self) -> int | None:
        """The command's wait status, once the init has ended and said it; None if it
        never did (the init was killed)."""
        data = b""
        with contextlib.suppress(OSError):
            while chunk := os.read(self.status, 4096):
                data += chunk
        for line in data.decode(errors="replace").splitlines():
            kind, _, value = line.partition(" ")
            if kind == "exit" and value.isdigit():
                return int(value)
        return None

    def close(self) -> None:
        self._close(self.control, self.status, self.child_control, self.child_status)

    def _close(self, *fds: int) -> None:
        for fd in fds:
            if fd not in self.closed:
                self.closed.add(fd)
                os.close(fd)
