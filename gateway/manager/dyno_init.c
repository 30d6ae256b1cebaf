/*
 * dyno-init: the first process of every dyno, and its only helper.
 *
 * Why it exists (docs/architecture.md, "The dyno's init"):
 *  - A dyno ends when its command ends, unless the client hung up first: then whatever
 *    survived the hang-up (a `nohup` job, a process trapping SIGHUP) runs on, detached,
 *    until it ends, is stopped or is cycled. Knowing when "everything is gone" needs a
 *    reaper: PID 1 of the dyno's PID namespace, or a child subreaper (the process
 *    sandbox).
 *  - Stopping a dyno means "all processes get SIGTERM, then SIGKILL" (Heroku); jobs of an
 *    interactive shell sit in process groups of their own, so only the reaper reaches
 *    them all.
 *  - As root it also builds the dyno's sandbox (namespaces, filesystem) ahead of time,
 *    so that starting a session is one message: a prepared sandbox. It is small and
 *    native on purpose: one runs beside every dyno, 1,000 dynos per host.
 *
 * Two modes:
 *
 *   dyno-init [--ctty] --control FD --status FD -- PROGRAM [ARG...]
 *     Start PROGRAM now (the process sandbox; inside bubblewrap without root).
 *
 *   dyno-init --sandbox SPECFD --control FD --status FD
 *     As root: build the sandbox the spec describes (gateway/manager/namespaces_spec.py
 *     writes it), say "pid N" (the init's pid, a child of the manager) and "ready", and
 *     wait for the start message on the control socket.
 *
 * The control descriptor is a SOCK_SEQPACKET socket from the manager. Packets:
 *   h  the client hung up: from now on, when PROGRAM ends, wait for the dyno's other
 *      processes too; and if PROGRAM has not exec'd yet, send it SIGHUP and SIGCONT
 *      (after the exec the manager signals the terminal's session and foreground group
 *      itself, as the kernel does for sshd)
 *   t  SIGTERM (then SIGCONT) to every process of the dyno
 *   k  SIGKILL to every process of the dyno
 *   S  (sandbox mode) start: NUL-separated HOSTNAME, "pty" or "pipes", ARGC, ARGV...,
 *      then the environment, with stdin, stdout and stderr as SCM_RIGHTS descriptors
 * EOF on the control socket means the manager is gone: SIGKILL to everything.
 *
 * On the status descriptor it writes lines: "pid N" and "ready" (sandbox mode), "exit
 * STATUS" when PROGRAM ends (its raw wait status), "error TEXT" when it cannot go on.
 * It exits once PROGRAM has ended and no process of the dyno is left: with PROGRAM's exit
 * code, or 128+N when a signal N ended it. Until then it ignores the signals the manager
 * sends to the dyno's process group. PROGRAM's process keeps every signal blocked until
 * just before its exec, so one sent while it starts waits instead of being lost.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static int pid1;        /* PID 1 of a PID namespace: kill(-1) reaches exactly the dyno */
static int detached;    /* after PROGRAM ends, wait for the others */
static int exec_done;   /* PROGRAM's exec happened (or failed): its signals are its own */
static pid_t main_pid = -1;
static int main_status = -1;
static int status_fd = -1;

/* One line on the status pipe for the manager. */
static void say(const char *fmt, ...) {
    char line[512];
    va_list args;
    va_start(args, fmt);
    int len = vsnprintf(line, sizeof line, fmt, args);
    va_end(args);
    if (status_fd >= 0 && len > 0 && write(status_fd, line, (size_t)len) < 0) {
        /* The manager may be gone; the control socket tells us so. */
    }
}

static void die(const char *what) {
    char text[400];
    snprintf(text, sizeof text, "%s: %s", what, strerror(errno));
    dprintf(2, "dyno-init: %s\n", text);
    say("error %s\n", text);
    _exit(125);
}

static int parse_number(const char *text, long low, long high) {
    char *end;
    long value = strtol(text, &end, 10);
    if (*text == '\0' || *end != '\0' || value < low || value > high) {
        dprintf(2, "dyno-init: bad number %s\n", text);
        _exit(125);
    }
    return (int)value;
}

/* -- signalling every process of the dyno ------------------------------------------- */

/* Without a PID namespace: the processes whose parent chain leads to us. */
static int descendants(pid_t *out, int room) {
    enum { MAX = 65536 };
    static pid_t pids[MAX], parents[MAX];
    int count = 0, found = 0;
    DIR *proc = opendir("/proc");
    if (proc == NULL)
        return 0;
    struct dirent *entry;
    while ((entry = readdir(proc)) != NULL && count < MAX) {
        char path[64], buf[512];
        pid_t pid = (pid_t)atoi(entry->d_name);
        if (pid <= 0)
            continue;
        snprintf(path, sizeof path, "/proc/%d/stat", pid);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            continue;
        ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (n <= 0)
            continue;
        buf[n] = '\0';
        char *close_paren = strrchr(buf, ')');  /* the name may hold spaces and parens */
        char state;
        int ppid;
        if (close_paren == NULL || sscanf(close_paren + 1, " %c %d", &state, &ppid) != 2)
            continue;
        pids[count] = pid;
        parents[count] = (pid_t)ppid;
        count++;
    }
    closedir(proc);
    /* Breadth first from ourselves; out[] doubles as the queue. */
    pid_t self = getpid();
    int head = 0;
    for (int i = 0; i < count && found < room; i++)
        if (parents[i] == self)
            out[found++] = pids[i];
    while (head < found) {
        pid_t parent = out[head++];
        for (int i = 0; i < count && found < room; i++)
            if (parents[i] == parent)
                out[found++] = pids[i];
    }
    return found;
}

static void signal_all(int sig) {
    if (pid1) {
        kill(-1, sig);  /* from PID 1: every process of the namespace but ourselves */
        if (sig == SIGTERM)
            kill(-1, SIGCONT);
        return;
    }
    static pid_t found[65536];
    int n = descendants(found, 65536);
    for (int i = 0; i < n; i++) {
        kill(found[i], sig);
        if (sig == SIGTERM)
            kill(found[i], SIGCONT);
    }
}

static int exit_code(int status) {
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    if (WIFSIGNALED(status))
        return 128 + WTERMSIG(status);
    return 255;
}

/* -- the sandbox (as root) ------------------------------------------------------------ */

enum { MAX_ITEMS = 64 };

struct spec {
    uid_t uid;
    gid_t gid;
    const char *root;          /* an empty host dir the root is built on */
    long budget;               /* bytes: /app's changes, /tmp and /dev/shm together */
    const char *lower;         /* the release (overlay's lower layer), or none */
    int own_net;               /* a network namespace of its own */
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
static void parse_spec(int fd) {
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

static void write_text(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        die(path);
    size_t len = strlen(text);
    if (write(fd, text, len) != (ssize_t)len)
        die(path);
    close(fd);
}

static void join_cgroups(void) {
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
static void build_root(void) {
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
static void become_dyno_user(void) {
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

/* -- starting the command ------------------------------------------------------------ */

struct start {
    char *hostname;
    int pty;
    char **argv;
    char **envp;
    int fds[3];
};

/* The start packet: words and three descriptors. Returns 0 on success. */
static int read_start(int control, char *buf, size_t size, struct start *out) {
    char control_buf[CMSG_SPACE(3 * sizeof(int))];
    struct iovec iov = {.iov_base = buf, .iov_len = size - 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control_buf,
                         .msg_controllen = sizeof control_buf};
    ssize_t n = recvmsg(control, &msg, MSG_CMSG_CLOEXEC);
    if (n <= 1 || buf[0] != 'S' || (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)))
        return -1;
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    if (cmsg == NULL || cmsg->cmsg_type != SCM_RIGHTS ||
        cmsg->cmsg_len != CMSG_LEN(3 * sizeof(int)))
        return -1;
    memcpy(out->fds, CMSG_DATA(cmsg), 3 * sizeof(int));
    buf[n] = '\0';
    char *words[8192];
    int count = 0;
    for (char *p = buf + 1; p < buf + n && count < 8190; p += strlen(p) + 1)
        words[count++] = p;
    if (count < 3)
        return -1;
    out->hostname = words[0];
    out->pty = strcmp(words[1], "pty") == 0;
    int argc = atoi(words[2]);
    if (argc < 1 || 3 + argc > count)
        return -1;
    static char *argv[8192], *envp[8192];
    for (int i = 0; i < argc; i++)
        argv[i] = words[3 + i];
    argv[argc] = NULL;
    int envc = 0;
    for (int i = 3 + argc; i < count; i++)
        envp[envc++] = words[i];
    envp[envc] = NULL;
    out->argv = argv;
    out->envp = envp;
    return 0;
}

static pid_t start_program(char **argv, char **envp, int ctty, const int *stdio,
                           int sandboxed, int control, int started_w) {
    pid_t pid = fork();
    if (pid != 0)
        return pid;
    /* The command: every signal back at its default, still blocked until the exec. */
    struct sigaction dfl = {.sa_handler = SIG_DFL};
    for (int s = 1; s < NSIG; s++)
        sigaction(s, &dfl, NULL);  /* fails harmlessly for KILL, STOP and RT gaps */
    close(control);
    if (stdio != NULL) {
        for (int i = 0; i < 3; i++)
            if (dup2(stdio[i], i) < 0)
                die("stdio");
        for (int i = 0; i < 3; i++)
            if (stdio[i] > 2)
                close(stdio[i]);
    }
    if (ctty) {
        if (setsid() < 0)
            die("setsid");
        if (ioctl(0, TIOCSCTTY, 0) < 0)
            die("TIOCSCTTY");
    }
    if (sandboxed) {
        for (int i = 0; i < spec.n_rlimits; i++) {
            struct rlimit limit = {spec.rlimit_soft[i], spec.rlimit_hard[i]};
            if (setrlimit(spec.rlimit_res[i], &limit) < 0)
                die("setrlimit");
        }
        if (chdir("/app") < 0)
            die("/app");
        become_dyno_user();
        forbid_user_namespaces();
    }
    (void)started_w;  /* close-on-exec: the init learns of the exec by its EOF */
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);  /* what waited is delivered now */
    if (envp != NULL)
        execvpe(argv[0], argv, envp);
    else
        execvp(argv[0], argv);
    dprintf(2, "dyno-init: %s: %s\n", argv[0], strerror(errno));
    _exit(errno == ENOENT ? 127 : 126);
}

/* -- the reaper ----------------------------------------------------------------------- */

static void handle_command(char command) {
    if (command == 'h') {
        detached = 1;
        if (main_pid > 0 && !exec_done) {
            /* Blocked in PROGRAM's process until its exec, then delivered; after the
             * exec the manager's own signals reach it. */
            kill(main_pid, SIGHUP);
            kill(main_pid, SIGCONT);
        }
    } else if (command == 't') {
        signal_all(SIGTERM);
    } else if (command == 'k') {
        detached = 0;
        signal_all(SIGKILL);
    }
}

/* Until PROGRAM has ended and nothing of the dyno is left. In sandbox mode the start
 * packet comes first; `argv` is NULL then. */
static int run(int control, int sfd, int ctty, char **argv, int sandboxed) {
    int started[2] = {-1, -1};
    if (argv != NULL) {
        if (pipe2(started, O_CLOEXEC) < 0)
            die("pipe");
        main_pid = start_program(argv, NULL, ctty, NULL, 0, control, started[1]);
        if (main_pid < 0)
            die("fork");
        close(started[1]);
    }
    struct pollfd fds[3] = {
        {.fd = sfd, .events = POLLIN},
        {.fd = control, .events = POLLIN},
        {.fd = started[0], .events = POLLIN},
    };
    static char packet[1 << 20];
    for (;;) {
        if (poll(fds, 3, -1) < 0) {
            if (errno == EINTR)
                continue;
            die("poll");
        }
        if (fds[2].fd >= 0 && fds[2].revents) {
            exec_done = 1;
            close(started[0]);
            fds[2].fd = -1;
        }
        if (fds[1].fd >= 0 && fds[1].revents) {
            /* Commands first: the manager writes `h` before it hangs up the dyno, so a
             * command that dies of the hang-up finds the dyno already detached. */
            for (;;) {
                if (main_pid < 0 && sandboxed) {
                    struct start start;
                    ssize_t peeked = recv(control, packet, 1, MSG_PEEK | MSG_DONTWAIT);
                    if (peeked == 1 && packet[0] == 'S') {
                        if (read_start(control, packet, sizeof packet, &start) < 0) {
                            errno = EPROTO;
                            die("a bad start message");
                        }
                        if (sethostname(start.hostname, strlen(start.hostname)) < 0)
                            die("sethostname");
                        if (pipe2(started, O_CLOEXEC) < 0)
                            die("pipe");
                        main_pid = start_program(start.argv, start.envp, start.pty, start.fds,
                                                 1, control, started[1]);
                        if (main_pid < 0)
                            die("fork");
                        close(started[1]);
                        fds[2].fd = started[0];
                        for (int i = 0; i < 3; i++)
                            close(start.fds[i]);
                        /* The init needs nothing privileged any more; and a process of
                         * the dyno, with the same uid, may not ptrace it. */
                        become_dyno_user();
                        prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
                        continue;
                    }
                }
                char command;
                ssize_t n = recv(control, &command, 1, MSG_DONTWAIT);
                if (n == 1) {
                    handle_command(command);
                    continue;
                }
                if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
                    /* The manager is gone: so is the dyno. */
                    fds[1].fd = -1;
                    detached = 0;
                    signal_all(SIGKILL);
                    if (main_pid < 0)
                        return 0;  /* prepared, never started */
                }
                break;
            }
        }
        if (fds[0].revents) {
            struct signalfd_siginfo info;
            while (read(sfd, &info, sizeof info) > 0) {
            }
        }
        /* Reap everything that ended: our own child, and orphans handed to us. */
        for (;;) {
            int status;
            pid_t pid = waitpid(-1, &status, WNOHANG);
            if (pid > 0 && pid == main_pid) {
                main_status = status;
                say("exit %d\n", status);
                if (!detached)
                    signal_all(SIGKILL);  /* the dyno ends with its command */
                continue;
            }
            if (pid > 0) {
                if (main_status != -1 && !detached)
                    signal_all(SIGKILL);  /* one forked while we were killing */
                continue;
            }
            if (pid < 0 && errno == ECHILD && main_status != -1)
                return exit_code(main_status);  /* nothing of the dyno is left */
            break;
        }
    }
}

int main(int argc, char **argv) {
    int ctty = 0, control = -1, spec_fd = -1, i;
    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--") == 0) {
            i++;
            break;
        } else if (strcmp(argv[i], "--ctty") == 0) {
            ctty = 1;
        } else if (strcmp(argv[i], "--control") == 0 && i + 1 < argc) {
            control = parse_number(argv[++i], 3, 1 << 20);
        } else if (strcmp(argv[i], "--status") == 0 && i + 1 < argc) {
            status_fd = parse_number(argv[++i], 3, 1 << 20);
        } else if (strcmp(argv[i], "--sandbox") == 0 && i + 1 < argc) {
            spec_fd = parse_number(argv[++i], 3, 1 << 20);
        } else {
            dprintf(2, "dyno-init: unknown option %s\n", argv[i]);
            return 125;
        }
    }
    int sandboxed = spec_fd >= 0;
    if (control < 0 || status_fd < 0 || (!sandboxed && i >= argc)) {
        dprintf(2, "usage: dyno-init [--ctty] --control FD --status FD -- PROGRAM [ARG...]\n"
                   "       dyno-init --sandbox SPECFD --control FD --status FD\n");
        return 125;
    }
    prctl(PR_SET_NAME, "dyno-init");  /* exec'd through /proc/self/fd/N: comm would be N */
    if (sandboxed)
        parse_spec(spec_fd);

    /* Only stdio, the control socket and the status pipe go on. */
    for (int fd = 3; fd < 1024; fd++)
        if (fd != control && fd != status_fd)
            close(fd);
    if (fcntl(control, F_SETFD, FD_CLOEXEC) < 0 || fcntl(status_fd, F_SETFD, FD_CLOEXEC) < 0)
        die("control descriptors");

    if (sandboxed) {
        /* Prepare: the dyno's cgroup (its children inherit it), its namespaces, and a
         * PID namespace whose first process, PID 1, is the manager's own child
         * (CLONE_PARENT): this process says its pid and ends, and PID 1 is the dyno's
         * one helper. */
        join_cgroups();
        int flags = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWCGROUP;
        if (spec.own_net)
            flags |= CLONE_NEWNET;
        if (unshare(flags) < 0)
            die("unshare");
        pid_t child = (pid_t)syscall(SYS_clone, CLONE_PARENT | CLONE_NEWPID | SIGCHLD, 0, 0, 0, 0);
        if (child < 0)
            die("clone");
        if (child > 0) {
            say("pid %d\n", child);
            _exit(0);
        }
        /* The dyno's process group is ours (its id our pid, as the manager signals it):
         * the first process led the session, so this one may make its own. */
        if (setsid() < 0)
            die("setsid");
        build_root();
        say("ready\n");
    }

    pid1 = getpid() == 1;
    if (!pid1 && prctl(PR_SET_CHILD_SUBREAPER, 1) < 0)
        die("PR_SET_CHILD_SUBREAPER");
    /* The signals the manager sends the dyno's group are for PROGRAM, not for us. */
    static const int ignored[] = {SIGHUP,  SIGINT,  SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2,
                                  SIGALRM, SIGPIPE, SIGTSTP, SIGTTIN, SIGTTOU};
    struct sigaction ignore = {.sa_handler = SIG_IGN};
    for (size_t s = 0; s < sizeof ignored / sizeof ignored[0]; s++)
        sigaction(ignored[s], &ignore, NULL);
    /* All blocked: our child starts with them blocked (so nothing sent to it is lost
     * while it resets them), and only SIGCHLD is read, through the signalfd. */
    sigset_t all, chld;
    sigfillset(&all);
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    if (sigprocmask(SIG_BLOCK, &all, NULL) < 0)
        die("sigprocmask");
    int sfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sfd < 0)
        die("signalfd");
    return run(control, sfd, ctty, sandboxed ? NULL : &argv[i], sandboxed);
}
