"""Release views: each release as the dyno user owns it, made once per release, the lower
layer of every dyno's overlay /app. overlayfs copies files up with their owner and mode,
so a root-owned read-only release would leave /app read-only for the dyno."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from pathlib import Path

import trio

from gateway.manager.bwrap_args import DYNO_GID, DYNO_UID
from gateway.slugs import remove_tree

log = logging.getLogger(__name__)


class ReleaseViews:
    def __init__(self, views_dir: Path, releases_dir: Path, tools: dict[str, str]) -> None:
        self.views_dir = views_dir
        self.releases_dir = releases_dir
        self.tools = tools
        self._locks: dict[Path, trio.Lock] = {}

    async def view(self, app: str, release_dir: Path) -> Path:
        """The view of `release_dir`, made now if this is its first dyno. A release
        replaced in place (a new inode) gets a new view."""
        info = os.stat(release_dir)
        view = self.views_dir / app / f"{release_dir.name}.{info.st_ino}"
        if view.is_dir():
            return view
        lock = self._locks.setdefault(view, trio.Lock())
        async with lock:
            if view.is_dir():
                return view
            self.views_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            view.parent.mkdir(mode=0o700, exist_ok=True)
            partial = view.with_name(f".{view.name}.{secrets.token_hex(4)}")
            try:
                await copy_release(self.tools, release_dir, partial, owned=True)
                partial.rename(view)
            except BaseException:
                with trio.CancelScope(shield=True):
                    if partial.exists():
                        await trio.to_thread.run_sync(remove_tree, partial)
                raise
            log.info("release view made app=%s release=%s", app, release_dir.name)
        return view

    def remove_stale(self) -> None:
        """Views of releases that are gone, and half-made ones a dead manager left."""
        if not self.views_dir.is_dir():
            return
        for app_dir in self.views_dir.iterdir():
            for view in app_dir.iterdir():
                version, _, ino = view.name.rpartition(".")
                release = self.releases_dir / app_dir.name / version
                with contextlib.suppress(FileNotFoundError):
                    if not view.name.startswith(".") and str(os.stat(release).st_ino) == ino:
                        continue
                remove_tree(view)
            with contextlib.suppress(OSError):
                app_dir.rmdir()


async def copy_release(tools: dict[str, str], release_dir: Path, target: Path, owned: bool) -> None:
    """A writable copy of the release at `target`; `owned`: by the dyno user."""
    await run_tool(tools["cp"], "-a", "--reflink=auto", f"{release_dir}/.", target)
    if owned:
        await run_tool(tools["chown"], "-R", "-h", f"{DYNO_UID}:{DYNO_GID}", target)
    await run_tool(tools["chmod"], "-R", "u+w", target)


async def run_tool(*argv: str | Path) -> None:
    """Run a tool to completion; its stderr becomes the error."""
    result = await trio.run_process([str(a) for a in argv], capture_stderr=True, check=False)
    if result.returncode != 0:
        raise OSError(f"{Path(str(argv[0])).name} failed: {result.stderr.decode().strip()}")
