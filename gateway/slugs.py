"""Unpacking a slug (a .tar.gz of an app directory) into a read-only release.

The archive is read twice, as a stream each time. The first pass collects the
tar headers so that ``gateway.core.slug.plan`` can refuse the slug before
anything is written. The second pass extracts into a private temporary
directory beside ``dest``, checking every header against the plan again (the
file could change in between), and only a complete, sealed tree is renamed
to ``dest``. On any failure the temporary directory is removed.
"""

import errno
import gzip
import hashlib
import os
import secrets
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from gateway.core.procfile import ProcfileError, parse_procfile
from gateway.core.slug import MAX_MEMBERS, Member, SlugRefused, app_paths, plan
from gateway.store import Release, Store

__all__ = ["SlugRefused", "UnpackedSlug", "remove_tree", "unpack"]

CHUNK = 1 << 20  # bytes copied at a time, and the progress reporting step
MAX_PROCFILE_BYTES = 1 << 20
_MAX_EXT_HEADER = 1 << 20  # pax and GNU long-name headers are read into memory
_HEADER_ALLOWANCE = 16 << 10  # tar bytes per member beyond file data: headers, padding
_EXT_TYPES = frozenset(
    {
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
    }
)
_READ_ERRORS = (tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error)


@dataclass
class UnpackedSlug:
    """What ``unpack`` produced: archive digest and size, bytes unpacked, Procfile."""

    sha256: str
    size: int
    unpacked_bytes: int
    procfile: dict[str, str]


def unpack(
    archive: Path,
    dest: Path,
    max_bytes: int,
    progress: Callable[[int, int], None] | None = None,
    *,
    max_members: int = MAX_MEMBERS,
) -> UnpackedSlug:
    """Unpack the slug ``archive`` into ``dest``, which must not exist yet.

    Raises SlugRefused (with a one-line reason) for unsafe or broken slugs and
    FileExistsError if ``dest`` exists; I/O errors propagate.

    ``progress(done, total)`` is called about every MiB, with ``total`` the
    archive's size. The archive is read twice (check, then extract), so
    ``done`` counts half of each byte read and reaches ``total`` at the end.
    """
    if os.path.lexists(dest):
        raise FileExistsError(f"release already exists: {dest}")
    meter = _Meter(progress, os.stat(archive).st_size)
    budget = max_bytes + (max_members + 1) * _HEADER_ALLOWANCE
    members = _scan(archive, budget, meter, max_bytes, max_members)
    targets = _targets(members, plan(members, max_bytes, max_members))

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".unpacking", dir=dest.parent))
    try:
        unpacked, source = _extract(archive, budget, meter, tmp, members, targets, max_bytes)
        procfile = _load_procfile(tmp)
        _seal(tmp)
        os.rename(tmp, dest)
    except BaseException:
        with suppress(OSError):
            remove_tree(tmp)
        raise
    meter.finish()
    return UnpackedSlug(source.sha256.hexdigest(), source.count, unpacked, procfile)


def remove_tree(path: Path) -> None:
    """Delete a release tree, first giving its read-only directories back their write bit."""
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        raise NotADirectoryError(f"not a directory: {path}")
    os.chmod(path, 0o700)
    for top, dirs, _ in os.walk(path):
        for name in dirs:
            child = os.path.join(top, name)
            if not os.path.islink(child):
                os.chmod(child, 0o700)
    shutil.rmtree(path)


# Reading the archive


class _Meter:
    """Calls ``progress(done, total)`` at most once per CHUNK of ``done``.

    Both passes read the whole archive, so ``done`` is half the bytes read.
    """

    def __init__(self, progress: Callable[[int, int], None] | None, total: int) -> None:
        self._progress, self._total = progress, total
        self._read = self._reported = 0

    def advance(self, count: int) -> None:
        self._read += count
        if self._progress and self._read // 2 - self._reported >= CHUNK:
            self._report(min(self._read // 2, self._total))

    def finish(self) -> None:
        if self._progress and self._reported < self._total:
            self._report(self._total)

    def _report(self, done: int) -> None:
        assert self._progress is not None
        self._reported = done
        self._progress(done, self._total)


class _Source:
    """The raw archive file: hashes and counts what gzip reads from it."""

    def __init__(self, file: BinaryIO, meter: _Meter) -> None:
        self._file, self._meter = file, meter
        self.sha256 = hashlib.sha256()
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self.sha256.update(data)
        self.count += len(data)
        self._meter.advance(len(data))
        return data


class _Budget:
    """The decompressed tar stream, refused once it grows past ``limit`` bytes."""

    def __init__(self, file: gzip.GzipFile, limit: int) -> None:
        self._file, self._limit, self._count = file, limit, 0

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self._count += len(data)
        if self._count > self._limit:
            raise SlugRefused(f"slug too big: the tar data exceeds {self._limit} bytes")
        return data


# Not HeaderError as a whole: tarfile ends an archive on its Empty/EOFHeaderError.
_BAD_HEADERS: tuple[type[Exception], ...] = (
    tarfile.TruncatedHeaderError,  # type: ignore[attr-defined]  # tarfile has it, typeshed not
    tarfile.InvalidHeaderError,  # type: ignore[attr-defined]  # (the same)
)


class _TarInfo(tarfile.TarInfo):
    """TarInfo that refuses corrupt headers and huge extended headers.

    Plain tarfile treats a bad header after the first as the end of the
    archive, and reads pax/long-name headers into memory whatever their size.
    """

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> "_TarInfo":
        try:
            return super().frombuf(buf, encoding, errors)
        except _BAD_HEADERS as e:
            raise _not_tar(e) from None

    def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        # tarfile documents _proc_member() as the hook for subclasses.
        if self.type in _EXT_TYPES and self.size > _MAX_EXT_HEADER:
            raise SlugRefused(f"tar extended header of {self.size} bytes is too large")
        # A private hook typeshed does not list (tarfile's docs name it for subclasses).
        processed: tarfile.TarInfo = super()._proc_member(archive)  # type: ignore[misc]
        return processed


def _not_tar(error: BaseException | str) -> SlugRefused:
    return SlugRefused(f"not a gzipped tar archive: {error}")


@contextmanager
def _tar_errors() -> Iterator[None]:
    """Turn errors from reading a broken archive into SlugRefused."""
    try:
        yield
    except _READ_ERRORS as e:
        raise _not_tar(e) from None


@contextmanager
def _open_tar(
    archive: Path, budget: int, meter: _Meter
) -> Iterator[tuple[tarfile.TarFile, _Source]]:
    """Open ``archive`` as a gzipped tar stream (nothing seeks backwards).

    Read errors anywhere in the ``with`` body become SlugRefused.
    """
    with open(archive, "rb") as raw:
        source = _Source(raw, meter)
        with (
            _tar_errors(),
            gzip.GzipFile(fileobj=cast(BinaryIO, source), mode="rb") as unzipped,
            tarfile.open(
                fileobj=cast(BinaryIO, _Budget(unzipped, budget)), mode="r|", tarinfo=_TarInfo
            ) as tar,
        ):
            yield tar, source


def _entries(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Yield the archive's members, then check that nothing but zeros follows them.

    Draining the stream also makes gzip check its CRC and length trailer.
    """
    while (info := tar.next()) is not None:
        yield info
    assert tar.fileobj is not None
    while True:
        rest = tar.fileobj.read(CHUNK)
        if not rest:
            return
        if rest.count(0) != len(rest):
            raise _not_tar("unexpected data after the end of the archive")


def _member(info: tarfile.TarInfo) -> Member:
    """Describe a tar header as a core Member."""
    kind = next((k for k, test in _KIND_TESTS if test(info)), "other")
    return Member(
        name=info.name,
        kind=kind,
        size=info.size if kind == "file" else 0,
        mode=info.mode,
        linkname=info.linkname if kind in ("symlink", "hardlink") else "",
    )


_KIND_TESTS: tuple[tuple[str, Callable[[tarfile.TarInfo], bool]], ...] = (
    ("file", tarfile.TarInfo.isreg),
    ("dir", tarfile.TarInfo.isdir),
    ("symlink", tarfile.TarInfo.issym),
    ("hardlink", tarfile.TarInfo.islnk),
    ("chardev", tarfile.TarInfo.ischr),
    ("blockdev", tarfile.TarInfo.isblk),
    ("fifo", tarfile.TarInfo.isfifo),
)


def _scan(
    archive: Path, budget: int, meter: _Meter, max_bytes: int, max_members: int
) -> list[Member]:
    """First pass: the archive's members, stopping early once a limit is passed."""
    members: list[Member] = []
    total = 0
    with _open_tar(archive, budget, meter) as (tar, _):
        for info in _entries(tar):
            members.append(_member(info))
            total += members[-1].size
            if len(members) > max_members or total > max_bytes:
                break  # plan() refuses these members
    return members


def _targets(members: list[Member], planned: list[Member]) -> list[Member | None]:
    """Line up each archive member with its planned entry (None: dropped)."""
    paths = app_paths(members)
    kept = iter(planned)
    targets = [None if path is None else next(kept) for path in paths]
    assert all(t is None or t.name == p for t, p in zip(targets, paths, strict=True))
    return targets


# Writing the release


def _extract(
    archive: Path,
    budget: int,
    meter: _Meter,
    root: Path,
    members: list[Member],
    targets: list[Member | None],
    max_bytes: int,
) -> tuple[int, _Source]:
    """Second pass: write the planned members under ``root``; return bytes written."""
    written = 0
    with _open_tar(archive, budget, meter) as (tar, source):
        index = 0
        for info in _entries(tar):
            if index >= len(members) or _member(info) != members[index]:
                raise _changed()
            target = targets[index]
            index += 1
            if target is None:
                continue
            try:
                written += _place(root, target, tar, info, max_bytes - written)
            except OSError as e:
                if e.errno == errno.ENAMETOOLONG:
                    raise SlugRefused(f"{target.name[:200]!r}: name too long to unpack") from None
                raise
        if index != len(members):
            raise _changed()
        while source.read(CHUNK):
            pass  # hash anything gzip left unread
    return written, source


def _changed() -> SlugRefused:
    return SlugRefused("the archive changed while it was being unpacked")


def _place(
    root: Path, target: Member, tar: tarfile.TarFile, info: tarfile.TarInfo, room: int
) -> int:
    """Create one planned member; return the bytes written (at most ``room``).

    plan() guarantees no parent is a symlink; O_NOFOLLOW guards the last step.
    """
    path = os.path.join(root, target.name)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    if target.kind == "dir":
        os.makedirs(path, mode=0o700, exist_ok=True)
        return 0
    if os.path.lexists(path):
        os.unlink(path)  # the same path again: the later member wins, as with tar
    if target.kind == "symlink":
        os.symlink(target.linkname, path)
        return 0
    data = tar.extractfile(info)
    assert data is not None
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    count = 0
    with open(os.open(path, flags, 0o600), "wb") as out:
        while True:
            chunk = data.read(CHUNK)
            if not chunk:
                break
            count += len(chunk)
            if count > room:
                raise SlugRefused(f"slug too big: {target.name!r} unpacks past the size limit")
            out.write(chunk)
        os.fchmod(out.fileno(), 0o500 if target.mode & 0o111 else 0o400)
    return count


def _load_procfile(root: Path) -> dict[str, str]:
    """Parse the app's Procfile, if it has one; a bad one refuses the slug."""
    path = os.path.join(root, "Procfile")
    if not os.path.isfile(path):
        return {}
    with open(path, "rb") as file:
        data = file.read(MAX_PROCFILE_BYTES + 1)
    if len(data) > MAX_PROCFILE_BYTES:
        raise SlugRefused(f"bad Procfile: larger than {MAX_PROCFILE_BYTES} bytes")
    try:
        return parse_procfile(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise SlugRefused("bad Procfile: not valid UTF-8") from None
    except ProcfileError as e:
        raise SlugRefused(f"bad Procfile: {e}") from None


def _seal(root: Path) -> None:
    """Make every directory read-only (0o500); files were sealed as they were written.
    Only the gateway's user reads a release: a dyno sees its own copy (a view, or /app)."""
    for top, _, _ in os.walk(root, topdown=False):
        os.chmod(top, 0o500)


def import_release(
    store: Store,
    app: str,
    slug: Path,
    releases_dir: Path,
    max_unpacked_bytes: int,
    progress: Callable[[int, int], None] | None = None,
    owner: tuple[int, int] | None = None,
) -> tuple[Release, UnpackedSlug]:
    """Check and unpack `slug` and record it as the app's next release vN, in one step:
    the tree is renamed into `releases_dir/APP/vN` inside the transaction that allocates
    vN (which also stores the slug), so a failure at any point records nothing and leaves
    nothing. SlugRefused says why a slug is refused."""
    release_root = releases_dir / app
    release_root.mkdir(parents=True, exist_ok=True)
    incoming = release_root / f".incoming-{secrets.token_hex(4)}"
    unpacked = unpack(slug, incoming, max_unpacked_bytes, progress=progress)
    try:
        if owner is not None:
            own_tree(incoming, *owner)  # the app's, before it is a release (see own_tree)

        def place(version: int) -> None:
            incoming.rename(release_root / f"v{version}")

        release = store.add_release(
            app,
            unpacked.sha256,
            unpacked.size,
            unpacked.unpacked_bytes,
            unpacked.procfile,
            place=place,
            # The store keeps the archive itself (its digest checked against the one
            # just unpacked): in the database, or under state_dir/slugs with SQLite.
            slug=slug,
        )
    finally:
        if incoming.exists():
            remove_tree(incoming)
    return release, unpacked


def owned_by(root: Path, uid: int, gid: int) -> bool:
    """Whether `own_tree` has made this release the app's (its root goes last)."""
    info = root.lstat()
    return info.st_uid == uid and info.st_gid == gid


def own_tree(root: Path, uid: int, gid: int) -> None:
    """Make a release tree the app's: owned by its uid and gid, writable by it (overlayfs
    copies files up with their owner and mode, so /app is then the dyno's to change,
    while the release itself stays out of its sight). The root dir goes last, so its
    owner says the whole tree is done (a crash half-way is finished next time)."""
    if owned_by(root, uid, gid):
        return
    info = root.lstat()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            os.lchown(path, uid, gid)
            mode = os.lstat(path).st_mode
            if not stat.S_ISLNK(mode):
                os.chmod(path, stat.S_IMODE(mode) | stat.S_IWUSR)
    os.chmod(root, stat.S_IMODE(info.st_mode) | stat.S_IWUSR)
    os.chown(root, uid, gid)
