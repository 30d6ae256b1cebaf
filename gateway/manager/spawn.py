"""Starting a dyno's process from the manager's main thread, and waiting for it.

trio.lowlevel.open_process forks from a worker thread. Linux ties PR_SET_PDEATHSIG (what
`bwrap --die-with-parent` uses) to the *thread* that forked, and trio retires idle worker
threads after ten seconds: every dyno would then get its "parent died" signal ten
seconds in. So the fork happens here, on the main thread, which lives exactly as long
as the manager, and the wait goes through a pidfd.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterable
from pathlib import Path

import trio

# Where the manager looks for the programs it runs (bwrap, ip, nft, cp, ...): never the
# caller's PATH, and the PATH its helpers get.
TRUSTED_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def find_tools(names: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Absolute paths of `names` on TRUSTED_PATH, and the names not found."""
    found, missing = {}, []
    for name in names:
        path = shutil.which(name, path=TRUSTED_PATH)
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    return found, missing


class Child:
    """A child process of the manager: its pid, and an awaitable end. Either one this
    module started (subprocess keeps its own record, and reaps it), or one adopted by
    pid: the namespace sandbox's init, which the kernel made our child (CLONE_PARENT)."""

    def __init__(self, pid: int, popen: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self._popen = popen
        self._pidfd = os.pidfd_open(pid)
        self._ended = trio.Event()
        self._waiting = False
        self.returncode: int | None = None

    @classmethod
    def adopt(cls, pid: int) -> Child:
        return cls(pid)

    async def wait(self) -> int:
        """The return code (negative: killed by that signal). Any number of tasks may wait."""
        if not self._waiting:
            self._waiting = True
            try:
                await trio.lowlevel.wait_readable(self._pidfd)
            except BaseException:
                self._waiting = False
                raise
            if self._popen is not None:
                self.returncode = self._popen.wait()  # reaps at once: the pidfd said it ended
            else:
                _, status = os.waitpid(self.pid, 0)
                self.returncode = os.waitstatus_to_exitcode(status)
            os.close(self._pidfd)
            self._ended.set()
        await self._ended.wait()
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            os.kill(self.pid, signal.SIGKILL)


def spawn(
    argv: list[str],
    stdin: int,
    stdout: int,
    stderr: int,
    env: dict[str, str],
    cwd: Path,
    pass_fds: tuple[int, ...] = (),
    executable: str | None = None,
) -> Child:
    """Fork and exec now, on the calling (main) thread, in a new session of its own
    (the dyno's process group; a terminal's session is made by the dyno's init)."""
    popen = subprocess.Popen(
        argv,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        env=env,
        cwd=cwd,
        start_new_session=True,
        close_fds=True,
        pass_fds=pass_fds,
        executable=executable,
    )
    return Child(popen.pid, popen)
