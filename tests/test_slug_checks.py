"""plan(): which slug members are safe to unpack, on plain Member lists (gateway.core.slug)."""

from collections.abc import Iterable

import pytest

from gateway.core.slug import Member, SlugRefused, app_paths, plan

MB = 1 << 20


def f(name: str, size: int = 10, mode: int = 0o644) -> Member:
    return Member(name, "file", size, mode)


def d(name: str, mode: int = 0o755) -> Member:
    return Member(name, "dir", 0, mode)


def ln(name: str, target: str) -> Member:
    return Member(name, "symlink", 0, 0o777, target)


def names(members: list[Member]) -> list[str]:
    return [m.name for m in members]


def refused(members: Iterable[Member], max_bytes: int = MB, **kwargs: int) -> str:
    with pytest.raises(SlugRefused) as info:
        plan(members, max_bytes, **kwargs)
    reason = str(info.value)
    assert "\n" not in reason
    return reason


# Layout


def test_heroku_layout_strips_app_prefix() -> None:
    members = [d("./"), d("./app"), f("./app/Procfile"), d("./app/bin"), f("./app/bin/run", 5)]
    assert plan(members, MB) == [
        f("Procfile"),
        d("bin"),
        f("bin/run", 5),
    ]


def test_heroku_layout_drops_directories_outside_app() -> None:
    members = [d("."), d("tmp"), d("app"), f("app/web.py")]
    assert names(plan(members, MB)) == ["web.py"]
    assert app_paths(members) == [None, None, None, "web.py"]


def test_heroku_layout_without_leading_dot() -> None:
    assert names(plan([f("app/a"), f("app/b/c")], MB)) == ["a", "b/c"]


def test_bare_app_dir_is_kept_as_is() -> None:
    members = [d("./"), f("./Procfile"), d("./app"), f("./app/models.py"), f("Gemfile")]
    assert names(plan(members, MB)) == ["Procfile", "app", "app/models.py", "Gemfile"]


def test_names_are_normalised() -> None:
    members = [f(".//a//b/"), d("./x/./y/"), f("./.hidden")]
    assert names(plan(members, MB)) == ["a/b", "x/y", ".hidden"]


def test_plan_keeps_mode_size_and_link_fields() -> None:
    out = plan([f("app/run", 7, 0o755), ln("app/lnk", "run")], MB)
    assert out == [Member("run", "file", 7, 0o755), Member("lnk", "symlink", 0, 0o777, "run")]


def test_only_directories_all_inside_app() -> None:
    assert names(plan([d("app"), d("app/empty")], MB)) == ["empty"]


# Names


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("/etc/passwd", "absolute"),
        ("//app/x", "absolute"),
        ("../evil", "'..'"),
        ("app/../../evil", "'..'"),
        ("app/lib/..", "'..'"),
        ("a\0b", "NUL"),
        ("", "empty name"),
        ("./", "app directory"),
        (".", "app directory"),
    ],
)
def test_bad_names_are_refused(name: str, words: str) -> None:
    reason = refused([f("app/ok"), f(name)])
    assert words in reason
    if name:
        assert repr(name) in reason


def test_root_directory_is_dropped() -> None:
    assert names(plan([d("."), d("./"), f("a")], MB)) == ["a"]


# Types and modes


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("hardlink", "hard links"),
        ("chardev", "character devices"),
        ("blockdev", "block devices"),
        ("fifo", "fifos"),
        ("other", "'other'"),
        ("socket", "'socket'"),
    ],
)
def test_special_types_are_refused(kind: str, words: str) -> None:
    reason = refused([f("app/ok"), Member("app/bad", kind, 0, 0o644)])
    assert "'app/bad'" in reason
    assert words in reason


def test_hardlink_inside_tree_is_still_refused() -> None:
    reason = refused([f("app/a"), Member("app/b", "hardlink", 0, 0o644, "app/a")])
    assert "'app/b'" in reason
    assert "hard links are not allowed" in reason


@pytest.mark.parametrize(
    ("mode", "bit"), [(0o4755, "setuid"), (0o2755, "setgid"), (0o6755, "setuid")]
)
def test_setuid_and_setgid_files_are_refused(mode: int, bit: str) -> None:
    reason = refused([f("app/bin/su", mode=mode)])
    assert "'app/bin/su'" in reason
    assert bit in reason


def test_setgid_directory_is_allowed() -> None:
    assert names(plan([d("app/shared", 0o2775), f("app/shared/x")], MB)) == ["shared", "shared/x"]


def test_negative_size_is_refused() -> None:
    assert "negative size" in refused([f("app/x", -1)])


# Limits


def test_total_file_bytes_over_limit() -> None:
    members = [f("a", 600), d("big"), f("big/b", 500)]
    assert names(plan(members, 1100)) == ["a", "big", "big/b"]
    reason = refused(members, 1099)
    assert "too big" in reason
    assert "1099" in reason
    assert "'big/b'" in reason


def test_too_many_members() -> None:
    members = [f(f"f{i}", 0) for i in range(11)]
    assert len(plan(members, MB, max_members=11)) == 11
    assert "too many members" in refused(members, max_members=10)


def test_member_limit_does_not_consume_a_huge_iterable() -> None:
    endless = (f(f"f{i}", 0) for i in range(10**9))
    assert "more than 5" in refused(endless, max_members=5)


def test_empty_archive() -> None:
    assert "empty archive" in refused([])


def test_archive_with_only_the_root() -> None:
    assert "empty slug" in refused([d("./"), d(".")])


# Tree shape


def test_duplicate_path_of_different_kind() -> None:
    reason = refused([d("app/x"), f("./app/x")])
    assert "'./app/x'" in reason
    assert "twice" in reason


def test_duplicate_path_of_same_kind_is_kept() -> None:
    assert names(plan([f("a", 1), f("a", 2), d("b"), d("b/")], MB)) == ["a", "a", "b", "b"]


def test_member_inside_a_symlink_is_refused() -> None:
    # Unpacking app/lib/evil would write through the symlink.
    reason = refused([ln("app/lib", "bin"), d("app/bin"), f("app/lib/evil")])
    assert reason == "'app/lib/evil': its parent 'app/lib' is a symlink"


def test_member_inside_a_file_is_refused() -> None:
    assert "is a file" in refused([f("a"), f("a/b")])


# Symlinks


def test_symlink_inside_tree_is_accepted() -> None:
    members = [d("app/bin"), f("app/bin/y", mode=0o755), d("app/lib"), ln("app/lib/x", "../bin/y")]
    assert plan(members, MB)[-1] == ln("lib/x", "../bin/y")


@pytest.mark.parametrize(
    "target",
    ["bin/y", "./y", "..", "../lib/../bin", "../app", "dangling/../../bin", "y/"],
)
def test_symlink_targets_that_stay_inside(target: str) -> None:
    plan([d("app/lib"), ln("app/lib/x", target)], MB)


def test_symlink_to_the_app_root_is_accepted() -> None:
    plan([ln("app/current", "."), f("app/a")], MB)


@pytest.mark.parametrize(
    ("members", "words"),
    [
        ([ln("app/x", "/etc/passwd")], "absolute"),
        ([ln("app/x", "../etc")], "outside"),
        ([d("app/lib"), ln("app/lib/x", "../../secret")], "outside"),
        ([ln("app/x", "a/../../b")], "outside"),
        ([ln("x", "..")], "outside"),
        ([ln("app/x", "")], "empty"),
        ([ln("app/x", "a\0b")], "NUL"),
    ],
)
def test_escaping_symlinks_are_refused(members: list[Member], words: str) -> None:
    reason = refused([f("app/ok"), *members])
    assert "symlink" in reason
    assert words in reason
    assert f"{members[-1].name!r} -> {members[-1].linkname!r}: " in reason


def test_symlink_escape_through_another_symlink_is_refused() -> None:
    # a/b resolves to the root, so a/b/.. is outside even though 'a/b/..' looks like 'a'.
    members = [d("a"), ln("a/b", ".."), ln("c", "a/b/..")]
    assert "'c' -> 'a/b/..'" in refused(members)


def test_chained_symlinks_inside_tree_are_accepted() -> None:
    plan([d("a"), ln("a/b", ".."), ln("c", "a/b/a"), ln("e", "c/b/c")], MB)


def test_symlink_via_absolute_symlink_is_refused() -> None:
    reason = refused([ln("a", "/etc"), ln("b", "a/passwd")])
    assert "absolute" in reason


def test_symlink_loop_is_refused() -> None:
    assert "symlink loop" in refused([ln("a", "b"), ln("b", "a")])
    assert "symlink loop" in refused([d("d"), ln("d/self", "../d/self/x")])


def test_dangling_symlinks_resolve_lexically() -> None:
    plan([ln("a", "missing/x/../../b"), f("b"), ln("c", "a/../b")], MB)
    assert "outside" in refused([ln("a", "missing/../../x")])
    assert "outside" in refused([ln("a", "missing"), ln("b", "a/../..")])


@pytest.mark.parametrize("reverse", [False, True])
def test_symlink_chains_are_limited_whatever_their_order(reverse: bool) -> None:
    def chain(length: int) -> list[Member]:
        links = [f("l0")] + [ln(f"l{i}", f"l{i - 1}") for i in range(1, length + 1)]
        return links[::-1] if reverse else links

    plan(chain(40), MB)
    assert "too many levels of symlinks" in refused(chain(41))
    assert "too many levels of symlinks" in refused(chain(5000))  # no RecursionError


def test_file_over_an_earlier_implicit_directory_is_refused() -> None:
    reason = refused([f("app/a/b/c"), f("app/a")])
    assert reason == "'app/a/b/c': its parent 'app/a' is a file"
    deep = "/".join(["d"] * 1500)  # deeper than Python's recursion limit
    reason = refused([f(f"{deep}/x"), ln("d", ".")])
    assert reason.endswith("...': its parent 'd' is a symlink")  # long names are clipped
    assert len(reason) < 300


@pytest.mark.parametrize("which", ["name", "target"])
def test_overlong_names_and_targets_are_refused(which: str) -> None:
    long = "/".join(["x"] * 2048)  # 4095 characters: the most allowed
    plan([f(long)], MB)
    plan([ln("l", long)], MB)
    member = f(long + "y") if which == "name" else ln("l", long + "y")
    assert "longer than 4095 characters" in refused([member])


def test_checks_stay_fast_on_hostile_trees() -> None:
    deep = "/".join(["d"] * 2000)
    members = [f(f"{deep}/f{i}") for i in range(300)]
    # 39 layers of links, each naming the layer below 200 times: expanding
    # them naively would take 200**39 steps.
    members += [d("x"), ln("k0", "x")]
    members += [ln(f"k{i}", f"k{i - 1}/../" * 200 + f"k{i - 1}") for i in range(1, 40)]
    plan(members, MB)
