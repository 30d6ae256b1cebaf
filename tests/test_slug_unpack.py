"""unpack(): real .tar.gz slugs, good and malicious, into a release dir (gateway.slugs)."""

import gzip
import hashlib
import io
import os
import re
import stat
import tarfile
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import pytest

from gateway.core.slug import SlugRefused
from gateway.slugs import UnpackedSlug, remove_tree, unpack

MB = 1 << 20
Entry = tuple[tarfile.TarInfo, bytes | None]


def file_(name: str, data: bytes = b"", mode: int = 0o644) -> Entry:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def dir_(name: str, mode: int = 0o755) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, mode
    return info, None


def special(name: str, type_: bytes, linkname: str = "") -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = type_, linkname, 0o777
    return info, None


def link(name: str, target: str) -> Entry:
    return special(name, tarfile.SYMTYPE, target)


def tar_bytes(entries: list[Entry], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def slug(path: Path, entries: list[Entry]) -> Path:
    return write(path, gzip.compress(tar_bytes(entries)))


GOOD = [
    dir_("./"),
    dir_("./app"),
    file_("./app/Procfile", b"web: gunicorn app\nworker: python work.py\n"),
    dir_("./app/bin"),
    file_("./app/bin/run", b"#!/bin/sh\necho hi\n", 0o755),
    file_("./app/README", b"hello\n", 0o664),
    dir_("./app/lib", 0o700),
    link("./app/lib/run", "../bin/run"),
    file_("./app/deep/nested/file.txt", b"x" * 1000),
]


@pytest.fixture
def releases(tmp_path: Path) -> Path:
    """The app's release directory; unpack() targets releases/v1 in it."""
    path = tmp_path / "releases" / "myapp"
    path.mkdir(parents=True)
    return path


def assert_nothing_left(releases: Path) -> None:
    assert not (releases / "v1").exists()
    assert list(releases.iterdir()) == []


# A good slug


def test_good_slug_unpacks_read_only(tmp_path: Path, releases: Path) -> None:
    archive = slug(tmp_path / "slug.tgz", GOOD)
    dest = releases / "v1"

    result = unpack(archive, dest, max_bytes=MB)

    raw = archive.read_bytes()
    assert result == UnpackedSlug(
        sha256=hashlib.sha256(raw).hexdigest(),
        size=len(raw),
        unpacked_bytes=41 + 18 + 6 + 1000,
        procfile={"web": "gunicorn app", "worker": "python work.py"},
    )
    assert os.listdir(releases) == ["v1"]
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == [
        "Procfile",
        "README",
        "bin",
        "bin/run",
        "deep",
        "deep/nested",
        "deep/nested/file.txt",
        "lib",
        "lib/run",
    ]
    assert (dest / "bin/run").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (dest / "deep/nested/file.txt").read_bytes() == b"x" * 1000
    assert os.readlink(dest / "lib/run") == "../bin/run"
    assert (dest / "lib/run").read_bytes() == b"#!/bin/sh\necho hi\n"

    def mode(rel: str) -> int:
        return stat.S_IMODE(os.lstat(dest / rel).st_mode)

    assert mode("bin/run") == 0o500
    assert mode("README") == 0o400
    assert mode("Procfile") == 0o400
    assert {mode(d) for d in [".", "bin", "lib", "deep", "deep/nested"]} == {0o500}

    remove_tree(dest)
    assert list(releases.iterdir()) == []


def test_bare_app_dir_without_procfile(tmp_path: Path, releases: Path) -> None:
    archive = slug(tmp_path / "slug.tgz", [file_("web.py", b"print()\n"), dir_("app")])
    result = unpack(archive, releases / "v1", max_bytes=MB)
    assert result.procfile == {}
    assert sorted(os.listdir(releases / "v1")) == ["app", "web.py"]


def test_missing_parent_directories_are_created(tmp_path: Path) -> None:
    archive = slug(tmp_path / "slug.tgz", GOOD)
    dest = tmp_path / "new" / "releases" / "v7"
    unpack(archive, dest, max_bytes=MB)
    assert (dest / "Procfile").is_file()
    assert os.listdir(dest.parent) == ["v7"]


def test_duplicate_members_later_one_wins(tmp_path: Path, releases: Path) -> None:
    entries = [file_("a", b"first"), link("l", "a"), file_("a", b"second"), link("l", "b")]
    unpack(slug(tmp_path / "slug.tgz", entries), releases / "v1", max_bytes=MB)
    assert (releases / "v1/a").read_bytes() == b"second"
    assert os.readlink(releases / "v1/l") == "b"


def test_gnu_format_and_long_names(tmp_path: Path, releases: Path) -> None:
    name = "app/" + "/".join(["d" * 60] * 5) + "/f.txt"
    content = gzip.compress(tar_bytes([file_(name, b"long")], fmt=tarfile.GNU_FORMAT))
    unpack(write(tmp_path / "slug.tgz", content), releases / "v1", max_bytes=MB)
    assert (releases / "v1" / name.removeprefix("app/")).read_bytes() == b"long"


def test_progress_is_reported_every_megabyte(tmp_path: Path, releases: Path) -> None:
    data = os.urandom(3 * MB)  # incompressible, so the archive is about 3 MB too
    archive = slug(tmp_path / "slug.tgz", [file_("app/blob", data)])
    calls: list[tuple[int, int]] = []

    unpack(archive, releases / "v1", max_bytes=4 * MB, progress=lambda d, t: calls.append((d, t)))

    total = archive.stat().st_size  # done counts half of each byte read, in two passes
    assert calls[-1] == (total, total)
    assert all(t == total for _, t in calls)
    dones = [d for d, _ in calls]
    assert dones == sorted(dones)
    assert all(b - a >= MB for a, b in pairwise(dones[:-1]))
    assert 3 <= len(calls) <= total // MB + 1


def test_existing_dest_is_not_touched(tmp_path: Path, releases: Path) -> None:
    (releases / "v1").mkdir()
    with pytest.raises(FileExistsError):
        unpack(slug(tmp_path / "slug.tgz", GOOD), releases / "v1", max_bytes=MB)
    assert os.listdir(releases) == ["v1"]
    assert os.listdir(releases / "v1") == []


# Refused slugs leave nothing behind

REFUSED: dict[str, tuple[list[Entry], str]] = {
    "absolute path": ([file_("/etc/evil", b"x")], "'/etc/evil': absolute paths are not allowed"),
    "dot-dot": ([file_("app/ok"), file_("../evil", b"x")], "'../evil': '..' is not allowed"),
    "dot-dot inside": ([file_("app/../../evil", b"x")], "'..' is not allowed"),
    "symlink out": (
        [dir_("app/lib"), link("app/lib/x", "../../../etc/passwd")],
        "symlink points outside the app directory",
    ),
    "absolute symlink": ([link("app/x", "/etc/passwd")], "symlinks to absolute paths"),
    "write through symlink": (
        [link("app/lib", "bin"), dir_("app/bin"), file_("app/lib/evil", b"x")],
        "'app/lib/evil': its parent 'app/lib' is a symlink",
    ),
    "hard link": (
        [file_("app/a", b"x"), special("app/b", tarfile.LNKTYPE, "app/a")],
        "'app/b' (to 'app/a'): hard links are not allowed",
    ),
    "fifo": ([special("app/pipe", tarfile.FIFOTYPE)], "'app/pipe': fifos are not allowed"),
    "chardev": ([special("app/tty", tarfile.CHRTYPE)], "character devices are not allowed"),
    "blockdev": ([special("app/sda", tarfile.BLKTYPE)], "block devices are not allowed"),
    "setuid": ([file_("app/su", b"x", 0o4755)], "'app/su': setuid mode 4755"),
    "setgid": ([file_("app/sg", b"x", 0o2755)], "'app/sg': setgid mode 2755"),
    "over size": ([file_("app/a", b"a" * 600), file_("app/b", b"b" * 600)], "slug too big"),
    "name too long": ([file_("app/" + "n" * 300, b"x")], "name too long to unpack"),
    "no members": ([], "empty archive"),
    "only the root": ([dir_("./")], "empty slug"),
    "bad Procfile": (
        [file_("Procfile", b"web: ok\nthis is not a procfile\n")],
        "bad Procfile: line 2: expected 'type: command'",
    ),
    "Procfile not UTF-8": ([file_("Procfile", b"web: caf\xe9\n")], "bad Procfile: not valid UTF-8"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_slug(case: str, tmp_path: Path, releases: Path) -> None:
    entries, reason = REFUSED[case]
    archive = slug(tmp_path / "slug.tgz", entries)
    with pytest.raises(SlugRefused, match=re.escape(reason)):
        unpack(archive, releases / "v1", max_bytes=1000)
    assert_nothing_left(releases)


def test_too_many_members(tmp_path: Path, releases: Path) -> None:
    archive = slug(tmp_path / "slug.tgz", [file_(f"f{i}") for i in range(6)])
    with pytest.raises(SlugRefused, match="too many members: more than 5"):
        unpack(archive, releases / "v1", max_bytes=MB, max_members=5)
    assert_nothing_left(releases)


def good_tgz() -> bytes:
    return gzip.compress(tar_bytes(GOOD), mtime=0)


def corrupt_second_header(tar: bytes) -> bytes:
    second = 512 * 2  # the PAX-free first member: header + one data block
    return tar[:second] + b"garbage!" + tar[second + 8 :]


BROKEN: dict[str, tuple[Callable[[], bytes], str]] = {
    "plain text": (lambda: b"hello, this is not an archive\n", "Not a gzipped file"),
    "empty file": (lambda: b"", "empty file"),
    "truncated gzip": (lambda: good_tgz()[: len(good_tgz()) // 2], "end-of-stream"),
    "bad gzip CRC": (lambda: good_tgz()[:-8] + b"\0\0\0\0" + good_tgz()[-4:], "CRC check failed"),
    "gzipped text": (lambda: gzip.compress(b"just text\n" * 100), "not a gzipped tar archive"),
    "corrupt later header": (
        lambda: gzip.compress(
            corrupt_second_header(
                tar_bytes([file_("a", b"x"), file_("b", b"y")], tarfile.GNU_FORMAT)
            )
        ),
        "bad checksum",
    ),
    "data after the archive": (
        lambda: gzip.compress(tar_bytes([file_("a", b"x")]) + tar_bytes([file_("b", b"y")])),
        "unexpected data after the end of the archive",
    ),
    "huge pax header": (
        lambda: gzip.compress(tar_bytes([pax_file("a", {"comment": "c" * (2 * MB)})])),
        "extended header",
    ),
}


def pax_file(name: str, headers: dict[str, str]) -> Entry:
    info, data = file_(name, b"x")
    info.pax_headers = headers
    return info, data


@pytest.mark.parametrize("case", BROKEN)
def test_broken_archive(case: str, tmp_path: Path, releases: Path) -> None:
    make, words = BROKEN[case]
    archive = write(tmp_path / "slug.tgz", make())
    with pytest.raises(SlugRefused) as info:
        unpack(archive, releases / "v1", max_bytes=10 * MB)
    reason = str(info.value)
    assert words in reason
    assert "\n" not in reason
    if case != "huge pax header":
        assert reason.startswith("not a gzipped tar archive: ")
    assert_nothing_left(releases)


def test_archive_corrupted_during_extraction(tmp_path: Path, releases: Path) -> None:
    """A failure half-way through writing the release removes the temporary tree."""
    entries = [file_(f"app/f{i}", os.urandom(MB // 2)) for i in range(6)]
    archive = slug(tmp_path / "slug.tgz", entries)
    size = archive.stat().st_size
    corrupted = []

    def corrupt_once_extracting(done: int, total: int) -> None:
        if done >= (size + MB) // 2 and not corrupted:  # the second pass has read 1 MB
            corrupted.append(done)
            with archive.open("r+b") as f:
                f.seek(size // 2)
                f.write(b"\0" * (size // 2))
            assert any(p.name.startswith(".v1.") for p in releases.iterdir())

    with pytest.raises(SlugRefused, match="not a gzipped tar archive"):
        unpack(archive, releases / "v1", max_bytes=10 * MB, progress=corrupt_once_extracting)
    assert corrupted
    assert_nothing_left(releases)


def test_archive_replaced_between_passes(tmp_path: Path, releases: Path) -> None:
    """The second pass only writes what the first pass checked."""
    archive = slug(tmp_path / "slug.tgz", [file_("app/blob", os.urandom(3 * MB))])
    evil = slug(tmp_path / "evil.tgz", [link("app/blob", "/etc/passwd")])

    def swap_during_first_pass(done: int, total: int) -> None:
        if evil.exists():
            evil.rename(archive)  # the first pass keeps reading the file it opened

    with pytest.raises(SlugRefused, match="the archive changed while it was being unpacked"):
        unpack(archive, releases / "v1", max_bytes=10 * MB, progress=swap_during_first_pass)
    assert not evil.exists()
    assert_nothing_left(releases)


def test_rename_failure_removes_the_sealed_tree(tmp_path: Path, releases: Path) -> None:
    """If dest appears while unpacking, it is left alone and the temporary tree is removed."""
    entries = [*GOOD, file_("app/blob", os.urandom(3 * MB))]
    archive = slug(tmp_path / "slug.tgz", entries)
    dest = releases / "v1"

    def someone_else_unpacks(done: int, total: int) -> None:
        if done > total // 2 and not dest.exists():  # in the second pass
            dest.mkdir()
            (dest / "theirs").write_text("x")

    with pytest.raises(OSError):
        unpack(archive, dest, max_bytes=10 * MB, progress=someone_else_unpacks)
    assert os.listdir(releases) == ["v1"]
    assert os.listdir(dest) == ["theirs"]


def test_remove_tree_refuses_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    with pytest.raises(NotADirectoryError):
        remove_tree(tmp_path / "link")
    assert (tmp_path / "real").is_dir()
