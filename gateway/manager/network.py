"""Outbound-only networking for a dyno: slirp4netns as user-mode NAT into its own netns.

The dyno's network namespace has only loopback and a tap device that slirp4netns (a
process in the host's namespace) serves: connections the dyno opens become ordinary
sockets of slirp4netns on the host, so a console reaches the app's database; nothing on
the host or outside routes to the dyno's address (10.0.2.100), and no port is forwarded,
so nothing can connect in. `--disable-host-loopback` keeps the host's 127.0.0.1
services (the gateway's own ports among them) out of reach; the host's other addresses
are reachable like any other host.

slirp4netns runs sandboxed (its own mount namespace, seccomp) and exits when its exit
pipe closes: when the dyno is removed or when the manager dies, whichever comes first.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import trio

# The dyno's side of slirp4netns's default network.
DYNO_ADDRESS = "10.0.2.100"
GATEWAY_ADDRESS = "10.0.2.2"
DNS_ADDRESS = "10.0.2.3"
READY_TIMEOUT = 10.0


class NetworkError(Exception):
    """Outbound networking could not be set up; the message says why."""


def slirp_argv(slirp: str, pid: int, ready_fd: int, exit_fd: int) -> list[str]:
    """slirp4netns serving the network namespace of `pid` on tap0."""
    return [
        slirp,
        "--configure",
        "--mtu=65520",
        "--disable-host-loopback",
        "--enable-sandbox",
        "--enable-seccomp",
        f"--ready-fd={ready_fd}",
        f"--exit-fd={exit_fd}",
        str(pid),
        "tap0",
    ]


def resolv_conf() -> str:
    """A resolv.conf for the dyno: slirp4netns's DNS forwarder (the host's resolver)."""
    return f"nameserver {DNS_ADDRESS}\n"


class Slirp:
    """A running slirp4netns for one dyno."""

    def __init__(self, process: trio.Process, exit_w: int) -> None:
        self.process = process
        self._exit_w = exit_w

    @classmethod
    async def start(cls, slirp: str, pid: int, log_path: Path) -> Slirp:
        """Start slirp4netns for the netns of `pid` and wait until the dyno's network is
        configured. Raises NetworkError with slirp4netns's own words on failure."""
        ready_r, ready_w = os.pipe()
        exit_r, exit_w = os.pipe()
        try:
            with log_path.open("wb") as log_file:
                process = await trio.lowlevel.open_process(
                    slirp_argv(slirp, pid, ready_w, exit_r),
                    pass_fds=(ready_w, exit_r),
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                )
        except BaseException:
            for fd in (ready_r, ready_w, exit_r, exit_w):
                os.close(fd)
            raise
        os.close(ready_w)
        os.close(exit_r)
        self = cls(process, exit_w)
        try:
            async with trio.lowlevel.FdStream(ready_r) as ready:
                with trio.move_on_after(READY_TIMEOUT):
                    if await ready.receive_some(1) == b"1":
                        return self
            words = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise NetworkError(f"slirp4netns failed: {' / '.join(words) or 'no output'}")
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.stop()
            raise

    async def stop(self) -> None:
        """Close the exit pipe (slirp4netns exits on it), then make sure."""
        if self._exit_w >= 0:
            os.close(self._exit_w)
            self._exit_w = -1
        with trio.move_on_after(2):
            await self.process.wait()
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        await self.process.wait()
