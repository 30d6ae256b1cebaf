"""The holder: a root helper that owns a dyno's private mount (and network) namespace,
builds its filesystem there (gateway/manager/bwrap_args.py HOLDER_SCRIPT), and keeps the
namespaces alive until its stdin closes (the dyno is removed, or the manager died)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Sequence

import trio

from gateway.manager.bwrap_args import TRUSTED_PATH, holder_argv

# Seconds the holder may take to say each of its lines.
HOLDER_READY = 10.0


class HolderError(Exception):
    def __init__(self, status: int | None, output: str) -> None:
        super().__init__(f"holder failed (status {status}): {output.strip() or 'no output'}")
        self.status = status


class Holder:
    def __init__(self, process: trio.Process, lifeline: trio.lowlevel.FdStream) -> None:
        self.process = process
        self._lifeline = lifeline
        self._output = b""

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    async def start(cls, tools: dict[str, str], network: str, params: Sequence[str]) -> Holder:
        stdin_r, stdin_w = os.pipe()
        try:
            process = await trio.lowlevel.open_process(
                holder_argv(tools, network, params),
                stdin=stdin_r,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={"PATH": TRUSTED_PATH},
                cwd="/",
            )
        except BaseException:
            os.close(stdin_w)
            raise
        finally:
            os.close(stdin_r)
        return cls(process, trio.lowlevel.FdStream(stdin_w))

    async def said(self, line: bytes) -> None:
        """Until the holder has said `line`; HolderError (with what it said) if it ends
        or takes longer than HOLDER_READY."""
        stdout = self.process.stdout
        assert stdout is not None
        with trio.move_on_after(HOLDER_READY):
            while line not in self._output:
                chunk = await stdout.receive_some(4096)
                if not chunk:
                    break
                self._output += chunk
        if line not in self._output:
            status = self.process.poll()
            if status is None:
                with trio.move_on_after(1):
                    status = await self.process.wait()
            raise HolderError(status, self._output.decode(errors="replace"))

    async def ready(self) -> None:
        """It has built the filesystem: its output is no longer needed."""
        assert self.process.stdout is not None
        await self.process.stdout.aclose()

    async def end(self) -> None:
        """Close its lifeline (it exits on EOF), kill it if it lingers, reap it."""
        await end_process(self.process, self._lifeline)


async def end_process(process: trio.Process, lifeline: trio.abc.SendStream | None) -> None:
    """Close a helper's lifeline (it exits on EOF), kill it if it lingers, reap it."""
    if lifeline is not None:
        with contextlib.suppress(trio.ClosedResourceError, OSError):
            await lifeline.aclose()
    with trio.move_on_after(1):
        await process.wait()
        return
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    await process.wait()
