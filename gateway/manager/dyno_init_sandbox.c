/*
 * dyno-init's namespaces sandbox (sandbox mode, as root): the spec the manager writes
 * (gateway/manager/namespace_spec.py), the dyno's root built from it, and what each of
 * the dyno's processes gets before its exec: the rlimits, /app, the app's own user and
 * the seccomp filter (enter_sandbox).
 */
#include "dyno_init.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

enum { MAX_ITEMS = 64 };

struct spec {
    uid_t uid;
    gid_t gid;
    const char *root;          /* an empty host dir the root is built on */
    long budget;               /* bytes: /app's changes, /tmp and /dev/shm together */
    const char *lower;         /* the release (overlay's lower layer), or none */
    int own_net;               /* a network namespace of its own */
    const char *veth_host;     /* the veth pair's host end (name), or none */
    const char *veth_host_addr, *veth_dyno_addr; /* the /30's two addresses */
    const char *cgroups[8];    /* cgroup.procs files to join */
    int n_cgroups;
    const char *ro[MAX_ITEMS]; /* host dirs bound read-only at the same path */
    int n_ro;
    const char *link_path[16], *link_target[16];
    int n_links;
    const char *hide_dir[16], *hide_file[16];
    int n_hide_dirs, n_hide_files;
    const char *file_path[8], *file_text[8]; /* files written for the dyno (resolv.conf) */
    int n_files;
    int rlimit_res[8];
    rlim_t rlimit_soft[8], rlimit_hard[8];
    int n_rlimits;
};

static struct spec spec;

static char *read_all(int fd, size_t *size) {
    size_t room = 65536, used = 0;
    char *buf = malloc(room);
    if (buf == NULL)
        die("malloc");
    for (;;) {
        if (used == room) {
            room *= 2;
            if (room > (1 << 22) || (buf = realloc(buf, room)) == NULL) {
                errno = E2BIG;
                die("sandbox spec");
            }
        }
        ssize_t n = read(fd, buf + used, room - used);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            die("reading the sandbox spec");
        if (n == 0)
            break;
        used += (size_t)n;
    }
    close(fd);
    *size = used;
    return buf;
}

static int rlimit_named(const char *name) {
    if (strcmp(name, "NOFILE") == 0)
        return RLIMIT_NOFILE;
    if (strcmp(name, "CORE") == 0)
        return RLIMIT_CORE;
    if (strcmp(name, "DATA") == 0)
        return RLIMIT_DATA;
    if (strcmp(name, "NPROC") == 0)
        return RLIMIT_NPROC;
    dprintf(2, "dyno-init: unknown rlimit %s\n", name);
    _exit(125);
}

/* The spec: NUL-terminated words, each keyword followed by its values. */
void parse_spec(int fd) {
    size_t size;
    char *buf = read_all(fd, &size);
    char *words[4096];
    int n = 0;
    for (size_t at = 0; at < size && n < 4096;) {
        words[n++] = buf + at;
        char *end = memchr(buf + at, '\0', size - at);
        if (end == NULL) {
            errno = EINVAL;
            die("sandbox spec not NUL-terminated");
        }
        at = (size_t)(end - buf) + 1;
    }
#define NEED(k)                                                                        \
    if (i + (k) >= n) {                                                                \
        errno = EINVAL;                                                                \
        die(words[i]);                                                                 \
    }
    for (int i = 0; i < n; i++) {
        const char *key = words[i];
        if (strcmp(key, "uid") == 0) {
            NEED(1) spec.uid = (uid_t)parse_number(words[++i], 1, 0x7fffffff);
        } else if (strcmp(key, "gid") == 0) {
            NEED(1) spec.gid = (gid_t)parse_number(words[++i], 1, 0x7fffffff);
        } else if (strcmp(key, "root") == 0) {
            NEED(1) spec.root = words[++i];
        } else if (strcmp(key, "budget") == 0) {
            NEED(1) spec.budget = strtol(words[++i], NULL, 10);
        } else if (strcmp(key, "lower") == 0) {
            NEED(1) spec.lower = words[++i];
        } else if (strcmp(key, "net") == 0) {
            NEED(1) spec.own_net = strcmp(words[++i], "own") == 0;
        } else if (strcmp(key, "veth") == 0) {
            NEED(3) spec.veth_host = words[++i];
            spec.veth_host_addr = words[++i];
            spec.veth_dyno_addr = words[++i];
        } else if (strcmp(key, "cgroup") == 0 && spec.n_cgroups < 8) {
            NEED(1) spec.cgroups[spec.n_cgroups++] = words[++i];
        } else if (strcmp(key, "ro") == 0 && spec.n_ro < MAX_ITEMS) {
            NEED(1) spec.ro[spec.n_ro++] = words[++i];
        } else if (strcmp(key, "symlink") == 0 && spec.n_links < 16) {
            NEED(2) spec.link_target[spec.n_links] = words[++i];
            spec.link_path[spec.n_links++] = words[++i];
        } else if (strcmp(key, "hide-dir") == 0 && spec.n_hide_dirs < 16) {
            NEED(1) spec.hide_dir[spec.n_hide_dirs++] = words[++i];
        } else if (strcmp(key, "hide-file") == 0 && spec.n_hide_files < 16) {
            NEED(1) spec.hide_file[spec.n_hide_files++] = words[++i];
        } else if (strcmp(key, "file") == 0 && spec.n_files < 8) {
            NEED(2) spec.file_path[spec.n_files] = words[++i];
            spec.file_text[spec.n_files++] = words[++i];
        } else if (strcmp(key, "rlimit") == 0 && spec.n_rlimits < 8) {
            NEED(3) spec.rlimit_res[spec.n_rlimits] = rlimit_named(words[++i]);
            spec.rlimit_soft[spec.n_rlimits] = (rlim_t)strtoull(words[++i], NULL, 10);
            spec.rlimit_hard[spec.n_rlimits++] = (rlim_t)strtoull(words[++i], NULL, 10);
        } else {
            errno = EINVAL;
            die(key);
        }
    }
#undef NEED
    if (spec.root == NULL || spec.uid == 0 || spec.gid == 0 || spec.budget <= 0) {
        errno = EINVAL;
        die("sandbox spec lacks root, uid, gid or budget");
    }
}

static void mkdirs(const char *path, mode_t mode) {
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p == '/') {
            *p = '\0';
            if (mkdir(buf, mode) < 0 && errno != EEXIST)
                die(buf);
            *p = '/';
        }
    }
    if (mkdir(buf, mode) < 0 && errno != EEXIST)
        die(buf);
}

static void touch(const char *path) {
    int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
        die(path);
    close(fd);
}

static void bind_mount(const char *source, const char *target, unsigned long extra) {
    if (mount(source, target, NULL, MS_BIND | MS_REC, NULL) < 0)
        die(target);
    if (extra && mount(NULL, target, NULL, MS_REMOUNT | MS_BIND | extra, NULL) < 0)
        die(target);
}

/* A file every process of the dyno reads (resolv.conf, passwd): 0644 whatever the
 * manager's umask (077: its state is private). */
static void write_text(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0 || fchmod(fd, 0644) < 0)
        die(path);
    size_t len = strlen(text);
    if (write(fd, text, len) != (ssize_t)len)
        die(path);
    close(fd);
}

void join_cgroups(void) {
    char pid[32];
    snprintf(pid, sizeof pid, "%d\n", getpid());
    for (int i = 0; i < spec.n_cgroups; i++) {
        int fd = open(spec.cgroups[i], O_WRONLY | O_CLOEXEC);
        if (fd < 0 || write(fd, pid, strlen(pid)) < 0)
            die(spec.cgroups[i]);
        close(fd);
    }
}

/* In the new namespaces, as PID 1: the dyno's filesystem, then pivot_root into it. */
void build_root(void) {
    char path[4096], options[256];
    const char *root = spec.root;
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
        die("making mounts private");
    /* The skeleton: a small tmpfs, read-only once built. */
    if (mount("dyno", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755") < 0)
        die(root);
    /* The one writable budget: /app's changes, /tmp and /dev/shm, all on one tmpfs. */
    snprintf(path, sizeof path, "%s/.rw", root);
    mkdirs(path, 0700);
    snprintf(options, sizeof options, "size=%ld,mode=0755", spec.budget);
    if (mount("dyno", path, "tmpfs", MS_NOSUID | MS_NODEV, options) < 0)
        die(path);
    const char *writable[] = {"upper", "work", "tmp", "shm", "files"};
    for (size_t i = 0; i < 5; i++) {
        snprintf(path, sizeof path, "%s/.rw/%s", root, writable[i]);
        mkdirs(path, i >= 2 && i <= 3 ? 01777 : 0755);
        if (i >= 2 && i <= 3 && chmod(path, 01777) < 0)
            die(path);
        if (i == 0 && chown(path, spec.uid, spec.gid) < 0)
            die(path);
    }
    /* The stack, read-only; merged-/usr links as links. */
    for (int i = 0; i < spec.n_ro; i++) {
        snprintf(path, sizeof path, "%s%s", root, spec.ro[i]);
        mkdirs(path, 0755);
        bind_mount(spec.ro[i], path, MS_RDONLY | MS_NOSUID | MS_NODEV);
    }
    for (int i = 0; i < spec.n_links; i++) {
        snprintf(path, sizeof path, "%s%s", root, spec.link_path[i]);
        if (symlink(spec.link_target[i], path) < 0 && errno != EEXIST)
            die(path);
    }
    /* The gateway's own paths inside a bound stack dir: covered. */
    for (int i = 0; i < spec.n_hide_dirs; i++) {
        snprintf(path, sizeof path, "%s%s", root, spec.hide_dir[i]);
        if (mount("hidden", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k") < 0)
            die(path);
    }
    for (int i = 0; i < spec.n_hide_files; i++) {
        snprintf(path, sizeof path, "%s%s", root, spec.hide_file[i]);
        bind_mount("/dev/null", path, MS_RDONLY);
    }
    /* Files written for the dyno (its resolv.conf), from the budget tmpfs, read-only. */
    for (int i = 0; i < spec.n_files; i++) {
        char source[4096];
        snprintf(source, sizeof source, "%s/.rw/files/%d", root, i);
        write_text(source, spec.file_text[i]);
        snprintf(path, sizeof path, "%s%s", root, spec.file_path[i]);
        bind_mount(source, path, MS_RDONLY | MS_NOSUID | MS_NODEV);
    }
    /* /app: an overlay of the release. The lower dir goes by descriptor (opened here, in
     * this mount namespace: overlayfs clones the lower dir's mount, which must be ours)
     * and the others relative to the budget tmpfs, so /proc/self/mountinfo names no host
     * path. */
    snprintf(path, sizeof path, "%s/app", root);
    mkdirs(path, 0755);
    if (spec.lower != NULL) {
        int lower = open(spec.lower, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (lower < 0)
            die(spec.lower);
        char rw[4096];
        snprintf(rw, sizeof rw, "%s/.rw", root);
        if (chdir(rw) < 0)
            die(rw);
        snprintf(options, sizeof options,
                 "lowerdir=/proc/self/fd/%d,upperdir=upper,workdir=work", lower);
        if (mount("overlay", path, "overlay", MS_NOSUID | MS_NODEV, options) < 0)
            die("the /app overlay");
        close(lower);
    } else if (chown(path, spec.uid, spec.gid) < 0) {
        die(path);
    }
    /* /tmp */
    snprintf(path, sizeof path, "%s/tmp", root);
    mkdirs(path, 01777);
    char source[4096];
    snprintf(source, sizeof source, "%s/.rw/tmp", root);
    bind_mount(source, path, MS_NOSUID | MS_NODEV);
    /* /dev: the usual devices from the host, a terminal namespace of its own, /dev/shm. */
    snprintf(path, sizeof path, "%s/dev", root);
    mkdirs(path, 0755);
    if (mount("dev", path, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=0755") < 0)
        die(path);
    const char *devices[] = {"null", "zero", "full", "random", "urandom", "tty"};
    for (size_t i = 0; i < 6; i++) {
        char host[64];
        snprintf(host, sizeof host, "/dev/%s", devices[i]);
        snprintf(path, sizeof path, "%s/dev/%s", root, devices[i]);
        touch(path);
        bind_mount(host, path, MS_NOSUID | MS_NOEXEC);
    }
    snprintf(path, sizeof path, "%s/dev/pts", root);
    mkdirs(path, 0755);
    if (mount("devpts", path, "devpts", MS_NOSUID | MS_NOEXEC,
              "newinstance,ptmxmode=0666,mode=0620") < 0)
        die(path);
    snprintf(path, sizeof path, "%s/dev/ptmx", root);
    if (symlink("pts/ptmx", path) < 0)
        die(path);
    snprintf(path, sizeof path, "%s/dev/shm", root);
    mkdirs(path, 01777);
    snprintf(source, sizeof source, "%s/.rw/shm", root);
    bind_mount(source, path, MS_NOSUID | MS_NODEV);
    const char *fd_links[][2] = {{"/proc/self/fd", "fd"},      {"/proc/self/fd/0", "stdin"},
                                 {"/proc/self/fd/1", "stdout"}, {"/proc/self/fd/2", "stderr"}};
    for (size_t i = 0; i < 4; i++) {
        snprintf(path, sizeof path, "%s/dev/%s", root, fd_links[i][1]);
        if (symlink(fd_links[i][0], path) < 0)
            die(path);
    }
    /* /proc of this PID namespace: the dyno sees only itself. */
    snprintf(path, sizeof path, "%s/proc", root);
    mkdirs(path, 0555);
    if (mount("proc", path, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
        die(path);
    /* Into it: the host's tree is let go, the budget tmpfs stays only where bound. */
    if (chdir(root) < 0)
        die(root);
    if (syscall(SYS_pivot_root, ".", ".") < 0)
        die("pivot_root");
    if (umount2(".", MNT_DETACH) < 0)
        die("leaving the host's root");
    if (chdir("/") < 0)
        die("/");
    if (umount2("/.rw", MNT_DETACH) < 0 || rmdir("/.rw") < 0)
        die("/.rw");
    if (mount(NULL, "/", NULL, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL) < 0)
        die("a read-only /");
}

/* No new user namespaces from inside a dyno: they would hand its processes capabilities
 * over objects of their own making, a kernel attack surface bubblewrap also closes
 * (--disable-userns). clone3 takes its flags in memory a filter cannot read: ENOSYS
 * makes the C library fall back to clone. */
static void forbid_user_namespaces(void) {
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW), /* another arch: no filter */
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_clone3, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_unshare, 2, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_clone, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        /* unshare(flags) and clone(flags, ...): the flags are the first argument. */
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[0])),
        BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, CLONE_NEWUSER, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog program = {.len = sizeof filter / sizeof filter[0], .filter = filter};
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &program) < 0)
        die("seccomp");
}

/* Root no more: the dyno's own uid and gid, no capabilities, none to regain. */
void become_dyno_user(void) {
    for (int cap = 0; cap <= 63; cap++)
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EINVAL)
            die("dropping capabilities");
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
    if (setgroups(0, NULL) < 0 || setresgid(spec.gid, spec.gid, spec.gid) < 0 ||
        setresuid(spec.uid, spec.uid, spec.uid) < 0)
        die("changing to the dyno's user");
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        die("no_new_privs");
}

int spec_own_net(void) {
    return spec.own_net;
}

int spec_veth(void) {
    return spec.veth_host != NULL;
}

/* In the dyno's new network namespace, `host` a netlink socket of the host's (or -1). */
void spec_build_network(int host) {
    build_network(host, spec.veth_host, spec.veth_host_addr, spec.veth_dyno_addr);
}

/* In a process of the dyno, before its exec: the spec's rlimits, /app, the app's user (the
 * command's process is still root; an entered one already runs as the init's user, which
 * is the app's), no user namespaces. */
void enter_sandbox(void) {
    for (int i = 0; i < spec.n_rlimits; i++) {
        struct rlimit limit = {spec.rlimit_soft[i], spec.rlimit_hard[i]};
        if (setrlimit(spec.rlimit_res[i], &limit) < 0)
            die("setrlimit");
    }
    if (chdir("/app") < 0)
        die("/app");
    if (getuid() == 0)
        become_dyno_user();
    forbid_user_namespaces();
}
