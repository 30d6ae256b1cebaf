"""The front's syscall filter, built with libseccomp (the library systemd's
SystemCallFilter= uses) through ctypes: its Python binding is Debian's, for Debian's
Python only, and five calls do not warrant a dependency. No hand-written BPF.

The filter allows everything but what the front never does and an attacker inside it
would want: running programs, changing users, mounts and namespaces, tracing other
processes, kernel modules, keyrings, BPF, raw kernel interfaces. Those fail with EPERM.
It outlives nothing: it is the front process's own and dies with it.
"""

from __future__ import annotations

import ctypes
import errno

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_ERRNO = 0x00050000
LIBRARY = "libseccomp.so.2"  # Debian's libseccomp2, which systemd itself needs

DENIED = (
    # running programs and new processes (threads use clone/clone3, which stay)
    "execve", "execveat", "fork", "vfork",
    # users, groups and capabilities
    "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setgroups",
    "setfsuid", "setfsgid", "capset",
    # mounts, namespaces, roots
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "fsopen", "fsmount",
    "fsconfig", "fspick", "move_mount", "open_tree", "mount_setattr",
    # other processes' memory and descriptors
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
    # the kernel itself
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "bpf", "perf_event_open", "keyctl", "add_key", "request_key", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "iopl", "ioperm", "syslog",
    "reboot", "swapon", "swapoff", "acct", "quotactl", "lookup_dcookie", "uselib",
    "personality", "vhangup", "sethostname", "setdomainname", "settimeofday",
    "clock_settime", "clock_adjtime", "adjtimex", "mknod", "mknodat",
    "open_by_handle_at", "name_to_handle_at", "fanotify_init", "move_pages",
    "migrate_pages", "mbind",
)  # fmt: skip


class SeccompUnavailable(Exception):
    """libseccomp cannot be loaded or refused the filter."""


def deny_dangerous_syscalls() -> int:
    """Load the filter for this process (no_new_privs must be set, or we be root);
    returns how many syscalls it denies."""
    try:
        lib = ctypes.CDLL(LIBRARY, use_errno=True)
    except OSError as exc:
        raise SeccompUnavailable(
            f"{LIBRARY}: {exc} (Debian: apt-get install libseccomp2)"
        ) from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                     ctypes.c_uint]  # fmt: skip
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise SeccompUnavailable("seccomp_init failed")
    denied = 0
    try:
        for name in DENIED:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number < 0:
                continue  # not a syscall on this architecture
            result = lib.seccomp_rule_add(ctx, SCMP_ACT_ERRNO | errno.EPERM, number, 0)
            if result < 0:
                raise SeccompUnavailable(f"seccomp_rule_add({name}): {-result}")
            denied += 1
        result = lib.seccomp_load(ctx)
        if result < 0:
            raise SeccompUnavailable(f"seccomp_load: {errno.errorcode.get(-result, -result)}")
    finally:
        lib.seccomp_release(ctx)
    return denied
