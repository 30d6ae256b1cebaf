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
 *  - It is already in every namespace, the cgroup and the root of the dyno, as the
 *    dyno's user: a process it forks is inside the dyno (`ssh APP.run.N`), and a socket
 *    it connects is in the dyno's network (port forwarding).
 *
 * Two modes:
 *
 *   dyno-init [--ctty] --control FD --status FD -- PROGRAM [ARG...]
 *     Start PROGRAM now (the process sandbox; inside bubblewrap without root).
 *
 *   dyno-init --sandbox SPECFD --control FD --status FD
 *     As root: build the sandbox the spec describes (gateway/manager/namespace_spec.py
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
 *   E  enter, once PROGRAM runs: "pty" or "pipes", ARGC, ARGV..., the environment, with
 *      stdin, stdout, stderr and the session's own socket (dyno_init_sessions.c)
 *   C  connect, once PROGRAM runs: ADDRESS, PORT, with the socket to answer on
 * EOF on the control socket means the manager is gone: SIGKILL to everything.
 *
 * On the status descriptor it writes lines: "pid N" and "ready" (sandbox mode), "exit
 * STATUS" when PROGRAM ends (its raw wait status), "error TEXT" when it cannot go on.
 * It exits once PROGRAM has ended and no process of the dyno is left: with PROGRAM's exit
 * code, or 128+N when a signal N ended it. Until then it ignores the signals the manager
 * sends to the dyno's process group. PROGRAM's process keeps every signal blocked until
 * just before its exec, so one sent while it starts waits instead of being lost.
 */
#include "dyno_init.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static int pid1;        /* PID 1 of a PID namespace: kill(-1) reaches exactly the dyno */
static int detached;    /* after PROGRAM ends, wait for the others */
static int exec_done;   /* PROGRAM's exec happened (or failed): its signals are its own */
static int drop_at_exec; /* sandbox mode: become the dyno's user once PROGRAM has */
static pid_t main_pid = -1;
static int main_status = -1;

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

/* -- control packets ----------------------------------------------------------------- */

enum { MAX_PACKET_FDS = 4 };

struct packet {
    char *data;  /* the kind, then NUL-terminated words */
    size_t len;
    int fds[MAX_PACKET_FDS];
    int n_fds;
};

/* The next packet: 1, 0 on EOF, -1 when none waits (or on a read error: errno). Its
 * descriptors are close-on-exec. One with more descriptors than any packet carries has
 * them closed and comes with none (its handler refuses it). */
static int read_packet(int control, char *buf, size_t size, struct packet *out) {
    char control_buf[CMSG_SPACE(MAX_PACKET_FDS * sizeof(int))];
    struct iovec iov = {.iov_base = buf, .iov_len = size - 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control_buf,
                         .msg_controllen = sizeof control_buf};
    ssize_t n = recvmsg(control, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (n < 0)
        return -1;
    out->n_fds = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (int i = 0; i < count && out->n_fds < MAX_PACKET_FDS; i++)
            memcpy(&out->fds[out->n_fds++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
    }
    if (n == 0 && out->n_fds == 0)
        return 0;
    if (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) {
        for (int i = 0; i < out->n_fds; i++)
            close(out->fds[i]);
        out->n_fds = 0;
        n = n > 0 ? 1 : 0;  /* only the kind is trusted: the handler refuses the rest */
    }
    buf[n] = '\0';
    out->data = buf;
    out->len = (size_t)n;
    return 1;
}

static void close_fds(const struct packet *packet) {
    for (int i = 0; i < packet->n_fds; i++)
        close(packet->fds[i]);
}

/* The start packet (sandbox mode): HOSTNAME, pty|pipes, ARGC, ARGV..., ENV... */
static pid_t start_command(struct packet *packet, int control) {
    static char *words[8192], *argv[8192];
    if (packet->n_fds != 3) {
        errno = EPROTO;
        die("a start message without three descriptors");
    }
    int count = split_words(packet->data + 1, packet->len - 1, words, 8190);
    int argc = count >= 3 ? atoi(words[2]) : 0;
    if (argc < 1 || 3 + argc > count) {
        errno = EPROTO;
        die("a bad start message");
    }
    if (sethostname(words[0], strlen(words[0])) < 0)
        die("sethostname");
    for (int i = 0; i < argc; i++)
        argv[i] = words[3 + i];
    argv[argc] = NULL;
    words[count] = NULL;  /* the environment follows the argv */
    int pty = strcmp(words[1], "pty") == 0;
    struct program program = {.argv = argv, .envp = &words[3 + argc], .stdio = packet->fds,
                              .new_session = pty, .ctty = pty, .sandboxed = 1};
    pid_t pid = start_program(&program, control);
    if (pid < 0)
        die("fork");
    close_fds(packet);
    return pid;
}

static void handle_signal_command(char command) {
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

/* -- the reaper ----------------------------------------------------------------------- */

enum { FD_SIGNALS, FD_CONTROL, FD_STARTED, FD_SESSIONS };

/* Every packet waiting on the control socket; 0 once the manager is gone. `started` is
 * the command's exec pipe, set when the start packet starts it. */
static int read_control(int control, int sandboxed, int *started) {
    static char buf[1 << 20];
    struct packet packet;
    int got;
    while ((got = read_packet(control, buf, sizeof buf, &packet)) == 1) {
        char kind = packet.len > 0 ? packet.data[0] : '\0';
        if (kind == 'S' && sandboxed && main_pid < 0) {
            int pipe_fds[2];
            if (pipe2(pipe_fds, O_CLOEXEC) < 0)
                die("pipe");
            main_pid = start_command(&packet, control);
            close(pipe_fds[1]);  /* the child's copy closes at its exec */
            *started = pipe_fds[0];
            drop_at_exec = 1;
        } else if (kind == 'E' && main_pid > 0) {
            enter_process(packet.data + 1, packet.len - 1, packet.fds, packet.n_fds, control,
                          sandboxed);
        } else if (kind == 'C' && main_pid > 0) {
            connect_inside(packet.data + 1, packet.len - 1, packet.fds, packet.n_fds);
        } else {
            close_fds(&packet);
            if (packet.len == 1)
                handle_signal_command(kind);
            else
                dprintf(2, "dyno-init: ignored a control message of kind %c\n", kind);
        }
    }
    return got == 0 || (errno != EAGAIN && errno != EINTR) ? 0 : 1;
}

/* Until PROGRAM has ended and nothing of the dyno is left. In sandbox mode the start
 * packet comes first; `program` is NULL then. */
static int run(int control, int sfd, const struct program *program, int sandboxed) {
    int started = -1;
    if (program != NULL) {
        int pipe_fds[2];
        if (pipe2(pipe_fds, O_CLOEXEC) < 0)
            die("pipe");
        main_pid = start_program(program, control);
        if (main_pid < 0)
            die("fork");
        close(pipe_fds[1]);
        started = pipe_fds[0];
    }
    struct pollfd fds[FD_SESSIONS + MAX_SESSIONS];
    for (;;) {
        fds[FD_SIGNALS] = (struct pollfd){.fd = sfd, .events = POLLIN};
        fds[FD_CONTROL] = (struct pollfd){.fd = control, .events = POLLIN};
        fds[FD_STARTED] = (struct pollfd){.fd = started, .events = POLLIN};
        int n_sessions = session_poll_fds(&fds[FD_SESSIONS], MAX_SESSIONS);
        if (poll(fds, FD_SESSIONS + n_sessions, -1) < 0) {
            if (errno == EINTR)
                continue;
            die("poll");
        }
        if (started >= 0 && fds[FD_STARTED].revents) {
            exec_done = 1;
            close(started);
            started = -1;
            if (drop_at_exec) {
                /* The init needs nothing privileged any more; and a process of the
                 * dyno, with the same uid, may not ptrace it. Not before PROGRAM is the
                 * dyno's user too: a signal from the dyno's user to a process that is
                 * still root fails (EPERM), and a stop or a hang-up sent between the
                 * fork and the exec would be lost. */
                become_dyno_user();
                prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
                drop_at_exec = 0;
            }
        }
        /* Commands first: the manager writes `h` before it hangs up the dyno, so a
         * command that dies of the hang-up finds the dyno already detached. */
        if (control >= 0 && fds[FD_CONTROL].revents && !read_control(control, sandboxed, &started)) {
            /* The manager is gone: so is the dyno. */
            close(control);
            control = -1;
            detached = 0;
            signal_all(SIGKILL);
            if (main_pid < 0)
                return 0;  /* prepared, never started */
        }
        session_events(&fds[FD_SESSIONS], n_sessions);
        if (fds[FD_SIGNALS].revents) {
            struct signalfd_siginfo info;
            while (read(sfd, &info, sizeof info) > 0) {
            }
        }
        /* Reap everything that ended: our own child, entered processes, and orphans. */
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
                session_reaped(pid, status);
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
        int host_net = spec_veth() ? nl_open() : -1;  /* opened in the host's namespace */
        int flags = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWCGROUP;
        if (spec_own_net())
            flags |= CLONE_NEWNET;
        if (unshare(flags) < 0)
            die("unshare");
        if (spec_own_net())
            spec_build_network(host_net);
        if (host_net >= 0)
            close(host_net);
        /* "pid" must come before "ready" on the status pipe: PID 1 says "ready" only
         * once this process has said the pid and ended (EOF on `said`). */
        int said[2];
        if (pipe2(said, O_CLOEXEC) < 0)
            die("pipe");
        pid_t child = (pid_t)syscall(SYS_clone, CLONE_PARENT | CLONE_NEWPID | SIGCHLD, 0, 0, 0, 0);
        if (child < 0)
            die("clone");
        if (child > 0) {
            say("pid %d\n", child);
            _exit(0);
        }
        close(said[1]);
        /* The dyno's process group is ours (its id our pid, as the manager signals it):
         * the first process led the session, so this one may make its own. */
        if (setsid() < 0)
            die("setsid");
        build_root();
        char byte;
        while (read(said[0], &byte, 1) < 0 && errno == EINTR) {
        }
        close(said[0]);
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
    if (sandboxed)
        return run(control, sfd, NULL, 1);
    struct program program = {.argv = &argv[i], .new_session = ctty, .ctty = ctty};
    return run(control, sfd, &program, 0);
}
