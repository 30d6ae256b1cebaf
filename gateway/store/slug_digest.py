"""Slugs the store keeps are written and read back with their digest and size checked:
a slug that is not what `releases:create` checked is never kept, nor unpacked."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from gateway.store.records import Release, SlugCorrupt

# Bytes per read and write of a slug (and per row, in PostgreSQL).
SLUG_CHUNK = 1024 * 1024


def check_slug(what: str, release: Release, sha256: str, size: int) -> None:
    """SlugCorrupt unless `sha256` and `size` are the release's."""
    if sha256 != release.slug_sha256 or size != release.slug_size:
        raise SlugCorrupt(
            f"{what} fails its digest check: recorded sha256 {release.slug_sha256} "
            f"({release.slug_size} bytes), found sha256 {sha256} ({size} bytes)"
        )


def copy_checked(source: Path, dest: Path, sha256: str, size: int, what: str) -> None:
    """Copy `source` to the new file `dest`, SlugCorrupt (and no `dest`) unless the bytes
    copied have this digest and size."""
    digest, count = hashlib.sha256(), 0
    try:
        with open(source, "rb") as src, open(dest, "xb") as out:
            while chunk := src.read(SLUG_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                count += len(chunk)
        if digest.hexdigest() != sha256 or count != size:
            raise slug_mismatch(what, sha256, size, digest, count)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


def slug_mismatch(what: str, sha256: str, size: int, digest: Any, count: int) -> SlugCorrupt:
    """The error for a slug whose bytes, read to be kept, are not those checked before."""
    return SlugCorrupt(
        f"{what} changed since it was checked: expected sha256 {sha256} ({size} bytes),"
        f" read sha256 {digest.hexdigest()} ({count} bytes)"
    )
