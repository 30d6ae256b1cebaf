"""Deciding whether a slug archive is safe to unpack, from its member list alone.

A slug is a tar of an app directory. This module never touches files: the
unpacker turns tar headers into ``Member`` values and asks ``plan()`` where each
one goes, or why the whole slug is refused. Rules:

* Layout. Heroku slugs hold ``./app/...``. Leading ``./`` and repeated or
  trailing slashes are dropped from names. If some member lives under
  ``app/`` and every non-directory member does, the ``app/`` prefix is
  stripped and directories outside ``app/`` (such as ``./``) are dropped.
  Otherwise the archive is the app directory itself and only the root
  directory ``.`` is dropped.
* Names. Refused: absolute paths, any ``..`` component, NUL characters, and
  names that are empty (or normalise to the root but are not directories).
* Types. Only files, directories and symlinks. Hard links (all of them),
  character and block devices, fifos and anything else are refused.
* Modes. Setuid or setgid bits are refused on anything but a directory (on a
  directory they are harmless and common, and unpacking makes it 0o555).
* Symlinks. The target must be relative and, resolved from the link's
  directory through the other links in the archive, must stay inside the app
  directory. Empty targets, link loops and chains over 40 deep are refused.
* Lengths. Names and link targets over 4095 characters (PATH_MAX) are
  refused, which also keeps every check linear in the archive's size.
* Tree. A path given twice with different types is refused, and so is a
  member whose parent is not a directory (it would be written through a
  symlink or into a file). The same path twice with the same type is kept;
  like tar, the later one wins when unpacking.
* Limits. More than ``max_members`` members, file sizes adding up to more
  than ``max_bytes``, an archive with no members, or nothing left after
  dropping directories.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import islice

__all__ = ["KINDS", "MAX_MEMBERS", "Member", "SlugRefused", "app_paths", "plan"]

KINDS = frozenset({"file", "dir", "symlink", "hardlink", "chardev", "blockdev", "fifo", "other"})
MAX_MEMBERS = 100_000
_MAX_LINK_HOPS = 40  # Linux's limit on symlinks followed in one lookup
_MAX_PATH = 4095  # PATH_MAX less the NUL: longer names could not be unpacked anyway
_TYPE_NAMES = {
    "hardlink": "hard links",
    "chardev": "character devices",
    "blockdev": "block devices",
    "fifo": "fifos",
}


@dataclass(frozen=True)
class Member:
    """One archive entry: its path, type (one of ``KINDS``), size, mode and link target."""

    name: str
    kind: str
    size: int
    mode: int
    linkname: str = ""


class SlugRefused(ValueError):
    """The slug is unsafe or unusable; ``str()`` is a one-line reason for the user."""


def app_paths(members: Sequence[Member]) -> list[str | None]:
    """Return each member's path relative to the app directory, or None if it is dropped.

    Only directories are dropped (the root, and what lies outside ``app/``).
    Names are checked here: a bad name raises SlugRefused.
    """
    parts = [_split(m) for m in members]
    under_app = [len(p) > 1 and p[0] == "app" for p in parts]
    strip = any(under_app) and all(
        inside for m, inside in zip(members, under_app, strict=True) if m.kind != "dir"
    )
    paths: list[str | None] = []
    for member, p, inside in zip(members, parts, under_app, strict=True):
        if strip:
            p = p[1:] if inside else []
        if not p and member.kind != "dir":
            raise SlugRefused(f"{_show(member.name)}: a {member.kind} cannot be the app directory")
        paths.append("/".join(p) or None)
    return paths


def plan(members: Iterable[Member], max_bytes: int, max_members: int = MAX_MEMBERS) -> list[Member]:
    """Return the members to unpack, in archive order, named relative to the app dir.

    Raises SlugRefused, naming the first offending member, if any rule in the
    module docstring is broken.
    """
    listed = list(islice(members, max_members + 1))
    if not listed:
        raise SlugRefused("empty archive: it has no members")
    if len(listed) > max_members:
        raise SlugRefused(f"too many members: more than {max_members}")
    paths = app_paths(listed)
    kept: list[Member] = []
    shown: dict[str, str] = {}  # relative path -> name in the archive, for messages
    total = 0
    for member, path in zip(listed, paths, strict=True):
        if path is None:
            continue
        _check_member(member)
        if member.kind == "file":
            total += member.size
            if total > max_bytes:
                raise SlugRefused(
                    f"slug too big: files add up to more than {max_bytes} bytes "
                    f"(reached at {_show(member.name)})"
                )
        kept.append(Member(path, member.kind, member.size, member.mode, member.linkname))
        shown[path] = _show(member.name)
    if not kept:
        raise SlugRefused("empty slug: the archive holds only the root directory")
    _check_tree(kept, shown)
    return kept


def _split(member: Member) -> list[str]:
    """Split a member name into path components, refusing unsafe names."""
    name = member.name
    if not name:
        raise SlugRefused("a member has an empty name")
    if "\0" in name:
        raise SlugRefused(f"{_show(name)}: name contains a NUL character")
    if len(name) > _MAX_PATH:
        raise SlugRefused(f"{_show(name)}: name is longer than {_MAX_PATH} characters")
    if name.startswith("/"):
        raise SlugRefused(f"{_show(name)}: absolute paths are not allowed")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise SlugRefused(f"{_show(name)}: '..' is not allowed in paths")
    return parts


def _check_member(member: Member) -> None:
    """Refuse a member whose type, mode, size or link target is unsafe on its own."""
    name = _show(member.name)
    if member.kind not in ("file", "dir", "symlink"):
        what = _TYPE_NAMES.get(member.kind, f"members of type {member.kind!r}")
        target = f" (to {_show(member.linkname)})" if member.linkname else ""
        raise SlugRefused(f"{name}{target}: {what} are not allowed")
    if member.kind != "dir" and member.mode & 0o6000:
        bits = "setuid" if member.mode & 0o4000 else "setgid"
        raise SlugRefused(f"{name}: {bits} mode {member.mode & 0o7777:o} is not allowed")
    if member.size < 0:
        raise SlugRefused(f"{name}: negative size {member.size}")
    if member.kind == "symlink":
        link = f"{name} -> {_show(member.linkname)}"
        if not member.linkname or "\0" in member.linkname:
            raise SlugRefused(f"{link}: symlink target is empty or contains NUL")
        if member.linkname.startswith("/"):
            raise SlugRefused(f"{link}: symlinks to absolute paths are not allowed")
        if len(member.linkname) > _MAX_PATH:
            raise SlugRefused(f"{link}: symlink target is longer than {_MAX_PATH} characters")


class _Node:
    """A path in the unpacked tree. Implicit nodes are parent dirs with no member."""

    __slots__ = (
        "busy",
        "children",
        "first_inside",
        "kind",
        "parent",
        "resolved",
        "shown",
        "target",
    )

    def __init__(self, parent: "_Node | None", kind: str, shown: str | None) -> None:
        self.parent, self.kind, self.shown = parent, kind, shown
        self.children: dict[str, _Node] = {}
        self.target = ""  # symlinks only
        self.resolved: tuple[_Node, int, int] | None = None  # see _resolve()
        self.busy = False  # being resolved: meeting it again is a loop
        self.first_inside = ""  # implicit dirs: the member that implied it, for messages


def _check_tree(members: list[Member], shown: dict[str, str]) -> None:
    """Refuse type clashes, paths through non-directories, and escaping symlinks.

    ``shown`` maps each path to its quoted archive name, for messages. The work
    is linear in the total length of names and link targets.
    """
    root = _Node(None, "dir", "'.'")
    links: list[_Node] = []
    for m in members:
        node = root
        *parents, last = m.name.split("/")
        for part in parents:
            child = node.children.get(part)
            if child is None:
                child = node.children[part] = _Node(node, "dir", None)
                child.first_inside = shown[m.name]
            elif child.kind != "dir":
                raise SlugRefused(f"{shown[m.name]}: its parent {child.shown} is a {child.kind}")
            node = child
        child = node.children.get(last)
        if child is None:
            child = node.children[last] = _Node(node, m.kind, shown[m.name])
        elif child.shown is None and m.kind != "dir":  # implicit dir: something is inside
            raise SlugRefused(f"{child.first_inside}: its parent {shown[m.name]} is a {m.kind}")
        elif child.kind != m.kind:
            raise SlugRefused(
                f"{shown[m.name]}: appears twice, as a {child.kind} and as a {m.kind}"
            )
        child.shown = shown[m.name]
        if m.kind == "symlink":
            child.target = m.linkname  # for a duplicate, the later link wins
            links.append(child)
    for link in links:
        _resolve(link)


def _resolve(link: _Node, nesting: int = 1) -> tuple[_Node, int, int]:
    """Return where ``link`` leads and how many links deep its resolution goes.

    Where it leads is a node plus how many missing levels lie below it. As in
    the kernel, a link resolves from its own directory, through the links it
    meets. Results are remembered, so each link is resolved once, and the
    depth does not depend on the order links are checked in (``nesting``
    only bounds the recursion).
    """
    if link.resolved is not None:
        return link.resolved
    message = f"{link.shown} -> {_show(link.target)}"
    if nesting > _MAX_LINK_HOPS:
        raise SlugRefused(f"{message}: too many levels of symlinks")
    link.busy = True
    assert link.parent is not None
    here, missing, depth = link.parent, 0, 1
    for part in link.target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if missing:
                missing -= 1
            elif here.parent is None:
                raise SlugRefused(f"{message}: symlink points outside the app directory")
            else:
                here = here.parent
        elif missing:
            missing += 1
        elif (child := here.children.get(part)) is None:
            missing = 1  # not in the archive, so nothing below it can be a link
        elif child.kind != "symlink":
            here = child
        elif child.busy:
            raise SlugRefused(f"{message}: symlink loop")
        else:
            here, missing, inner = _resolve(child, nesting + 1)
            depth = max(depth, inner + 1)
            if depth > _MAX_LINK_HOPS:
                raise SlugRefused(f"{message}: too many levels of symlinks")
    link.busy = False
    link.resolved = (here, missing, depth)
    return link.resolved


def _show(name: str, limit: int = 200) -> str:
    """Quote a member name for a one-line message, clipping very long ones."""
    if len(name) > limit:
        name = name[:limit] + "..."
    return repr(name)
