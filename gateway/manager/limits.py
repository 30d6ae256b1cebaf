"""Per-dyno resource limits through cgroups (v1 or v2), and the rlimits under them.

Each dyno gets a cgroup of its own under the gateway's parent group, which sits under the
cgroup the manager itself runs in (so the limits a service manager sets on the gateway
still cover its dynos). The parent's name is derived from the state dir, so two gateways
on one host never touch each other's dynos, and a restarted manager finds what a dead one
left behind.

- Memory: the size's memory, swap included where the host accounts for swap. Over it the
  kernel's OOM killer acts inside the dyno's group; `oom_kills()` then says so and the
  sandbox logs Heroku's R15.
- Processes: the size's pids cap (`pids.max`), which is what contains a fork bomb.
- CPU: a CFS quota of `cpu` cores per period, so one busy dyno cannot starve the gateway.

Parsing (/proc/self/cgroup, mountinfo, memory.events) and the list of files to write are
pure functions; the classes do the file I/O. Nothing here starts processes: a dyno's
processes join their group by writing their own pid (see bwrap.py), before they fork.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from gateway.config import SizeSettings
from gateway.core.sizes import Host

log = logging.getLogger(__name__)

CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000
R15 = "Error R15 (Memory quota vastly exceeded)"
# How long removing a group may wait for its killed processes to be gone.
REMOVE_DEADLINE = 10.0


class CgroupsUnavailable(Exception):
    """No usable cgroup hierarchy for dyno limits; the message says why."""


@dataclass(frozen=True)
class Limits:
    memory_bytes: int
    pids: int
    cpu_quota_us: int
    cpu_period_us: int = CPU_PERIOD_US


def limits_for(size: SizeSettings) -> Limits:
    """The cgroup limits for a dyno size (memory in MB, a CPU share in cores)."""
    return Limits(
        memory_bytes=size.memory * 1024 * 1024,
        pids=size.pids,
        cpu_quota_us=max(1000, round(size.cpu * CPU_PERIOD_US)),
    )


def parent_name(state_dir: Path) -> str:
    """The gateway's parent group name: one per state dir, stable across restarts."""
    digest = hashlib.sha256(os.fsencode(state_dir.resolve())).hexdigest()[:12]
    return f"gateway-{digest}"


# Pure parsers


def parse_proc_cgroup(text: str) -> tuple[dict[str, str], str | None]:
    """Split /proc/self/cgroup into {v1 controller: path} and the v2 path (or None)."""
    v1: dict[str, str] = {}
    v2: str | None = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2 = path
        else:
            for name in controllers.split(","):
                v1[name] = path
    return v1, v2


@dataclass(frozen=True)
class CgroupMount:
    mountpoint: Path
    root: str  # the hierarchy path mounted there ("/" unless the host hides its upper part)


def parse_cgroup_mounts(mountinfo: str) -> tuple[dict[str, CgroupMount], CgroupMount | None]:
    """The v1 mount of each controller and the v2 mount, from /proc/self/mountinfo."""
    v1: dict[str, CgroupMount] = {}
    v2: CgroupMount | None = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if len(fields) < sep + 4 or sep < 5:
            continue
        fstype, options = fields[sep + 1], fields[sep + 3].split(",")
        mount = CgroupMount(Path(_unescape(fields[4])), _unescape(fields[3]))
        if fstype == "cgroup2" and v2 is None:
            v2 = mount
        elif fstype == "cgroup":
            for name in options:
                if name in CONTROLLERS and name not in v1:
                    v1[name] = mount
    return v1, v2


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def group_dir(mount: CgroupMount, path: str) -> Path:
    """Where the group at hierarchy `path` is, under `mount`."""
    if mount.root != "/" and (path == mount.root or path.startswith(mount.root + "/")):
        path = path[len(mount.root) :]
    return mount.mountpoint / path.lstrip("/")


def oom_kills(text: str) -> int:
    """The `oom_kill N` count of memory.oom_control (v1) or memory.events (v2)."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return 0


def v1_settings(limits: Limits, memsw: bool) -> list[tuple[str, str, str]]:
    """(controller, file, value) to write, in order: memory before memory+swap."""
    settings = [("memory", "memory.limit_in_bytes", str(limits.memory_bytes))]
    if memsw:
        settings.append(("memory", "memory.memsw.limit_in_bytes", str(limits.memory_bytes)))
    settings += [
        ("pids", "pids.max", str(limits.pids)),
        ("cpu", "cpu.cfs_period_us", str(limits.cpu_period_us)),
        ("cpu", "cpu.cfs_quota_us", str(limits.cpu_quota_us)),
    ]
    return settings


def v2_settings(limits: Limits, swap: bool) -> list[tuple[str, str]]:
    """(file, value) to write for a v2 group; the whole group goes on OOM."""
    settings = [("memory.max", str(limits.memory_bytes))]
    if swap:
        settings.append(("memory.swap.max", "0"))
    settings += [
        ("memory.oom.group", "1"),
        ("pids.max", str(limits.pids)),
        ("cpu.max", f"{limits.cpu_quota_us} {limits.cpu_period_us}"),
    ]
    return settings


# The hierarchies


class Cgroups:
    """The gateway's parent group in each controller's hierarchy; one child per dyno."""

    def __init__(self, version: str, parents: dict[str, Path]) -> None:
        self.version = version
        self.parents = parents  # controller -> the gateway's parent group dir

    @classmethod
    def discover(cls, name: str) -> Cgroups:
        """Find the manager's own groups and make the gateway's parent group in each.
        Raises CgroupsUnavailable with the reason when neither v1 nor v2 can serve."""
        own_v1, own_v2 = parse_proc_cgroup(Path("/proc/self/cgroup").read_text())
        mounts_v1, mount_v2 = parse_cgroup_mounts(Path("/proc/self/mountinfo").read_text())
        if all(c in mounts_v1 and c in own_v1 for c in CONTROLLERS):
            parents = {c: group_dir(mounts_v1[c], own_v1[c]) / name for c in CONTROLLERS}
            try:
                for path in parents.values():
                    path.mkdir(exist_ok=True)
            except OSError as exc:
                raise CgroupsUnavailable(
                    f"cgroup v1: cannot create {exc.filename}: {exc}"
                ) from None
            return cls("v1", parents)
        if mount_v2 is not None and own_v2 is not None:
            return cls("v2", dict.fromkeys(CONTROLLERS, _v2_parent(mount_v2, own_v2, name)))
        missing = [c for c in CONTROLLERS if c not in mounts_v1]
        raise CgroupsUnavailable(
            f"no cgroup v2 and no cgroup v1 hierarchy for {', '.join(missing)}"
        )

    def describe(self) -> str:
        return f"cgroup {self.version} under {self.parents['memory']}"

    def create(self, dyno: str, limits: Limits) -> DynoCgroup:
        """Make the dyno's group(s) with its limits in force, before anything joins."""
        group = DynoCgroup(self.version, {c: p / dyno for c, p in self.parents.items()})
        try:
            for path in group.dirs:
                if self.version == "v1":  # the parent, should someone have removed it
                    path.parent.mkdir(exist_ok=True)
                path.mkdir()
            if self.version == "v1":
                memsw = (group.paths["memory"] / "memory.memsw.limit_in_bytes").exists()
                for controller, file, value in v1_settings(limits, memsw):
                    (group.paths[controller] / file).write_text(value)
            else:
                swap = (group.paths["memory"] / "memory.swap.max").exists()
                for file, value in v2_settings(limits, swap):
                    (group.paths["memory"] / file).write_text(value)
        except BaseException:
            group.remove_now()
            raise
        return group

    def cap_all(self, memory_bytes: int, pids: int) -> None:
        """The most all dynos together may take (the parent groups' limits), so that no
        mix of sizes can take the host from the gateway and everything else on it."""
        if self.version == "v1":
            (self.parents["memory"] / "memory.limit_in_bytes").write_text(str(memory_bytes))
            (self.parents["pids"] / "pids.max").write_text(str(pids))
        else:
            (self.parents["memory"] / "memory.max").write_text(str(memory_bytes))
            (self.parents["memory"] / "pids.max").write_text(str(pids))

    def remove_parents(self) -> None:
        """At exit: remove the gateway's parent groups if no dyno group is left in them."""
        for path in dict.fromkeys(self.parents.values()):
            with contextlib.suppress(OSError):
                path.rmdir()

    def leftovers(self) -> list[DynoCgroup]:
        """The dyno groups under the parent: at start, those a dead manager left."""
        names: set[str] = set()
        for parent in self.parents.values():
            if parent.is_dir():
                names.update(p.name for p in parent.iterdir() if p.is_dir())
        return [
            DynoCgroup(self.version, {c: p / name for c, p in self.parents.items()})
            for name in sorted(names)
        ]


def _v2_parent(mount: CgroupMount, own: str, name: str) -> Path:
    """The v2 parent group, with memory, pids and cpu delegated down to the dynos.

    v2 lets a group hand controllers to children only if it holds no processes itself.
    When the manager is alone in its group (a systemd service with Delegate=yes), it
    moves into a leaf `manager` child first; otherwise the host must delegate."""
    own_dir = group_dir(mount, own)
    available = (own_dir / "cgroup.controllers").read_text().split()
    missing = [c for c in CONTROLLERS if c not in available]
    if missing:
        raise CgroupsUnavailable(f"cgroup v2: {own_dir} lacks {', '.join(missing)}")
    enable = " ".join(f"+{c}" for c in CONTROLLERS)
    try:
        _enable(own_dir, enable)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise CgroupsUnavailable(f"cgroup v2: cannot delegate in {own_dir}: {exc}") from None
        procs = (own_dir / "cgroup.procs").read_text().split()
        if procs != [str(os.getpid())]:
            raise CgroupsUnavailable(
                f"cgroup v2: {own_dir} holds other processes; run the gateway in a group of "
                "its own with controllers delegated (systemd: Delegate=yes)"
            ) from None
        leaf = own_dir / "manager"
        leaf.mkdir(exist_ok=True)
        (leaf / "cgroup.procs").write_text(str(os.getpid()))
        _enable(own_dir, enable)
    parent = own_dir / name
    parent.mkdir(exist_ok=True)
    _enable(parent, enable)
    return parent


def _enable(group: Path, controllers: str) -> None:
    (group / "cgroup.subtree_control").write_text(controllers)


class DynoCgroup:
    """One dyno's group (one dir per v1 hierarchy, or one v2 dir)."""

    def __init__(self, version: str, paths: dict[str, Path]) -> None:
        self.version = version
        self.paths = paths
        self.oom_fd: int | None = None  # v1: an eventfd the kernel signals on OOM
        self.oom_seen = False

    def arm_oom(self) -> None:
        """v1: be told when the group runs out of memory, and keep the kernel from
        killing one process of it (the dyno would go on without it): `end_on_oom`
        kills the whole group instead. v2 needs neither: memory.oom.group does it."""
        if self.version != "v1":
            return
        memory = self.paths["memory"]
        event = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            control = os.open(memory / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
            try:
                (memory / "cgroup.event_control").write_text(f"{event} {control}")
            finally:
                os.close(control)
            (memory / "memory.oom_control").write_text("1")
        except BaseException:
            os.close(event)
            raise
        self.oom_fd = event

    async def end_on_oom(self) -> None:
        """Wait until the group runs out of memory, then kill everything in it. Returns
        early when `disarm_oom` closes the eventfd."""
        if self.oom_fd is None:
            return
        try:
            await trio.lowlevel.wait_readable(self.oom_fd)
        except trio.ClosedResourceError:
            return
        self.oom_seen = True
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def disarm_oom(self) -> None:
        if self.oom_fd is not None:
            trio.lowlevel.notify_closing(self.oom_fd)
            os.close(self.oom_fd)
            self.oom_fd = None

    @property
    def dirs(self) -> list[Path]:
        return list(dict.fromkeys(self.paths.values()))

    @property
    def procs_files(self) -> list[Path]:
        """The files a process writes its pid to, to join the dyno's group(s)."""
        return [d / "cgroup.procs" for d in self.dirs]

    def ran_out_of_memory(self) -> bool:
        return self.oom_seen or self.oom_kills() > 0

    def oom_kills(self) -> int:
        """How many processes the OOM killer ended in this group."""
        name = "memory.oom_control" if self.version == "v1" else "memory.events"
        try:
            return oom_kills((self.paths["memory"] / name).read_text())
        except OSError:
            return 0

    def pids(self) -> set[int]:
        found: set[int] = set()
        for file in self.procs_files:
            with contextlib.suppress(OSError):
                found.update(int(pid) for pid in file.read_text().split())
        return found

    def _kill_and_rmdir(self) -> bool:
        """One pass: SIGKILL what is left, remove the dirs that are empty. True when gone."""
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if pids:
            return False
        for path in reversed(self.dirs):
            try:
                path.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    return False
                raise
        return True

    async def remove(self) -> None:
        """Kill every process left in the group and remove it. Killed processes take a
        moment to be gone and v1 has no event for that, so this retries with a short,
        growing pause, within REMOVE_DEADLINE."""
        delay = 0.001
        with trio.move_on_after(REMOVE_DEADLINE):
            while not self._kill_and_rmdir():
                await trio.sleep(delay)
                delay = min(delay * 2, 0.05)
            return
        log.error("cgroup not removed (processes would not die): %s", self.dirs)

    def remove_now(self) -> None:
        """`remove` for synchronous callers (start-up cleanup, a failed create)."""
        delay, deadline = 0.001, time.monotonic() + REMOVE_DEADLINE
        while not self._kill_and_rmdir():
            if time.monotonic() > deadline:
                log.error("cgroup not removed (processes would not die): %s", self.dirs)
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


def host_figures() -> Host:
    """This host's memory (MB), pid_max and CPUs, for what dyno sizes can have."""
    memory_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_kb = int(line.split()[1])
    pids = int(Path("/proc/sys/kernel/pid_max").read_text())
    return Host(memory=memory_kb // 1024, pids=pids, cpus=os.cpu_count() or 1)
