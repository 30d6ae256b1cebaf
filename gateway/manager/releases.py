"""The unpacked releases on this node (`releases_dir/APP/vN`), fetched on first use.

With a shared database a release may have been created on another node: the first dyno
here that needs it fetches the slug from the store (digest-checked, Store.write_slug)
and unpacks it with the same checks as `releases:create` (gateway/slugs.py). One fetch
per release at a time: dynos arriving meanwhile wait for it rather than fetch again.
The fetch runs in a worker thread with a store connection of its own, so the manager
keeps supervising while a large slug streams in.
"""

from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path

import trio

from gateway.config import Config
from gateway.slugs import SlugRefused, unpack
from gateway.store import StoreError, StoreUnavailable, open_store

log = logging.getLogger(__name__)


class ReleaseUnavailable(Exception):
    """A release this node lacks and could not fetch; the message says why."""


class ReleaseCache:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._fetching: dict[Path, trio.Event] = {}

    def path(self, app: str, version: int) -> Path:
        return self.config.releases_dir / app / f"v{version}"

    async def ensure(self, app: str, version: int) -> Path:
        """The unpacked tree of `app` vN, fetched and unpacked first if this node lacks
        it; ReleaseUnavailable if that fails."""
        path = self.path(app, version)
        while not path.is_dir():
            fetching = self._fetching.get(path)
            if fetching is not None:
                await fetching.wait()
                if not path.is_dir():
                    raise ReleaseUnavailable(f"{app} v{version} could not be fetched")
                break
            done = self._fetching[path] = trio.Event()
            try:
                await trio.to_thread.run_sync(self._fetch, app, version, path)
            finally:
                del self._fetching[path]
                done.set()
        return path

    def _fetch(self, app: str, version: int, path: Path) -> None:
        started = time.monotonic()
        path.parent.mkdir(parents=True, exist_ok=True)
        slug = path.parent / f".fetch-v{version}-{secrets.token_hex(4)}.tgz"
        try:
            store = open_store(self.config, migrate=False)
            try:
                release = store.write_slug(app, version, slug)
            finally:
                store.close()
            unpack(slug, path, self.config.slugs.max_unpacked_bytes)
        except (StoreError, StoreUnavailable, SlugRefused, OSError) as exc:
            log.error("release fetch failed app=%s release=v%d error=%s", app, version, exc)
            raise ReleaseUnavailable(f"{app} v{version} could not be fetched: {exc}") from None
        finally:
            slug.unlink(missing_ok=True)
        log.info(
            "release fetched app=%s release=v%d bytes=%d seconds=%.2f",
            app, version, release.slug_size, time.monotonic() - started,
        )  # fmt: skip
