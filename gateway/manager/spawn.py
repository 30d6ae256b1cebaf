"""Starting a dyno's process from the manager's main thread, and waiting for it.

trio.lowlevel.open_process forks from a worker thread. Linux ties PR_SET_PDEATHSIG (what
`bwrap --die-with-parent` and `setpriv --pdeathsig` use) to the *thread* that forked,
and trio retires idle worker threads after ten seconds: every dyno would then get its
"parent died" signal ten seconds in. So the fork happens here, on the main thread, which
lives exactly as long as the manager, and the wait goes through a pidfd.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import trio


class Child:
    """A started process: its pid, and an awaitable end."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid
        self._pidfd = os.pidfd_open(popen.pid)
        self._ended = trio.Event()
        self._waiting = False

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    async def wait(self) -> int:
        """The return code (negative: killed by that signal). Any number of tasks may wait."""
        if not self._waiting:
            self._waiting = True
            try:
                await trio.lowlevel.wait_readable(self._pidfd)
            except BaseException:
                self._waiting = False
                raise
            self._popen.wait()  # reaps at once: the pidfd said it ended
            os.close(self._pidfd)
            self._ended.set()
        await self._ended.wait()
        assert self._popen.returncode is not None
        return self._popen.returncode

    def kill(self) -> None:
        if self._popen.returncode is None:
            self._popen.kill()


def spawn(
    argv: list[str],
    stdin: int,
    stdout: int,
    stderr: int,
    env: dict[str, str],
    cwd: Path,
    pass_fds: tuple[int, ...] = (),
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
    )
    return Child(popen)
