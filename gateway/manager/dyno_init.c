/*
 * dyno-init: the first process of every dyno, and its only helper.
 *
 * Why it exists (docs/architecture.md, "The dyno's init"):
 *  - A dyno ends when its command ends, unless the client hung up first: then whatever
 *    survived the hang-up (a `nohup` job, a process trapping SIGHUP) runs on, detached,
 *    until it ends, is stopped or is cycled. Knowing when "everything is gone" needs a
 *    reaper: PID 1 of the dyno's PID namespace (bwrap --as-pid-1), or a child
 *    subreaper (the process sandbox). bubblewrap's own PID 1 ends the namespace as soon
 *    as its first child exits, which kills the `nohup` job.
 *  - Stopping a dyno means "all processes get SIGTERM, then SIGKILL" (Heroku); jobs of an
 *    interactive shell sit in process groups of their own, so only the reaper reaches
 *    them all.
 *  - It is small and native on purpose: one per running dyno, 1,000 dynos per host.
 *
 * Usage: dyno-init [--ctty] --control FD --status FD -- PROGRAM [ARG...]
 *
 *  - Forks PROGRAM with every signal back at its default and unblocked. With --ctty the
 *    child makes a new session whose controlling terminal is its stdin (a PTY slave).
 *  - Reads one-byte commands from the control pipe:
 *      h  the client hung up: from now on, when PROGRAM ends, wait for the dyno's other
 *         processes too; and if PROGRAM has not exec'd yet, send it SIGHUP and SIGCONT
 *         (after the exec, the manager signals the terminal's session and foreground
 *         group itself, as the kernel does for sshd)
 *      t  SIGTERM (then SIGCONT) to every process of the dyno
 *      k  SIGKILL to every process of the dyno
 *    EOF on the control pipe means the manager is gone: SIGKILL to everything.
 *  - Writes "exit STATUS\n" to the status pipe when PROGRAM ends (STATUS: the raw wait
 *    status), then, unless detached, SIGKILLs what is left of the dyno.
 *  - Exits once PROGRAM has ended and no process of the dyno is left: with PROGRAM's
 *    exit code, or 128+N when a signal N ended it.
 *  - Ignores the signals the manager sends to the dyno's process group (HUP, INT, ...):
 *    those are for PROGRAM. PROGRAM's process keeps every signal blocked until just
 *    before its exec, so one sent while it starts waits instead of being lost.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static int pid1;        /* PID 1 of a PID namespace: kill(-1) reaches exactly the dyno */
static int detached;    /* after PROGRAM ends, wait for the others */
static int exec_done;   /* PROGRAM's exec happened (or failed): its signals are its own */
static pid_t main_pid;
static int main_status = -1;

static void die(const char *what) {
    dprintf(2, "dyno-init: %s: %s\n", what, strerror(errno));
    _exit(125);
}

static int parse_fd(const char *text) {
    char *end;
    long value = strtol(text, &end, 10);
    if (*text == '\0' || *end != '\0' || value < 3 || value > 1 << 20) {
        dprintf(2, "dyno-init: bad descriptor %s\n", text);
        _exit(125);
    }
    return (int)value;
}

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

static void report_exit(int status_fd, int status) {
    char line[32];
    int len = snprintf(line, sizeof line, "exit %d\n", status);
    if (status_fd >= 0 && write(status_fd, line, (size_t)len) < 0) {
        /* The manager may be gone; the control pipe tells us so. */
    }
}

static int exit_code(int status) {
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    if (WIFSIGNALED(status))
        return 128 + WTERMSIG(status);
    return 255;
}

int main(int argc, char **argv) {
    int ctty = 0, control = -1, status_fd = -1, i;
    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--") == 0) {
            i++;
            break;
        } else if (strcmp(argv[i], "--ctty") == 0) {
            ctty = 1;
        } else if (strcmp(argv[i], "--control") == 0 && i + 1 < argc) {
            control = parse_fd(argv[++i]);
        } else if (strcmp(argv[i], "--status") == 0 && i + 1 < argc) {
            status_fd = parse_fd(argv[++i]);
        } else {
            dprintf(2, "dyno-init: unknown option %s\n", argv[i]);
            return 125;
        }
    }
    if (i >= argc || control < 0 || status_fd < 0) {
        dprintf(2, "usage: dyno-init [--ctty] --control FD --status FD -- PROGRAM [ARG...]\n");
        return 125;
    }

    /* Only stdio, the control and the status pipe go on; nothing else leaks in. */
    for (int fd = 3; fd < 1024; fd++)
        if (fd != control && fd != status_fd)
            close(fd);
    if (fcntl(control, F_SETFD, FD_CLOEXEC) < 0 || fcntl(status_fd, F_SETFD, FD_CLOEXEC) < 0)
        die("control descriptors");

    prctl(PR_SET_NAME, "dyno-init");  /* exec'd through /proc/self/fd/N: comm would be N */
    pid1 = getpid() == 1;
    if (!pid1 && prctl(PR_SET_CHILD_SUBREAPER, 1) < 0)
        die("PR_SET_CHILD_SUBREAPER");

    sigset_t all, chld;
    sigfillset(&all);
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    /* The signals the manager sends the dyno's group are for PROGRAM, not for us. */
    static const int ignored[] = {SIGHUP,  SIGINT,  SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2,
                                  SIGALRM, SIGPIPE, SIGTSTP, SIGTTIN, SIGTTOU};
    struct sigaction ignore = {.sa_handler = SIG_IGN};
    for (size_t s = 0; s < sizeof ignored / sizeof ignored[0]; s++)
        sigaction(ignored[s], &ignore, NULL);
    /* All blocked: our child starts with them blocked (so nothing sent to it is lost
     * while it resets them), and only SIGCHLD is read, through the signalfd. */
    if (sigprocmask(SIG_BLOCK, &all, NULL) < 0)
        die("sigprocmask");
    int sfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sfd < 0)
        die("signalfd");

    int started[2];  /* closes at PROGRAM's exec (close-on-exec): then exec_done */
    if (pipe2(started, O_CLOEXEC) < 0)
        die("pipe");
    main_pid = fork();
    if (main_pid < 0)
        die("fork");
    if (main_pid == 0) {
        close(started[0]);
        struct sigaction dfl = {.sa_handler = SIG_DFL};
        for (int s = 1; s < NSIG; s++)
            sigaction(s, &dfl, NULL);  /* fails harmlessly for KILL, STOP and RT gaps */
        if (ctty) {
            if (setsid() < 0)
                die("setsid");
            if (ioctl(0, TIOCSCTTY, 0) < 0)
                die("TIOCSCTTY");
        }
        sigemptyset(&all);
        sigprocmask(SIG_SETMASK, &all, NULL);  /* what waited is delivered now */
        execvp(argv[i], &argv[i]);
        dprintf(2, "dyno-init: %s: %s\n", argv[i], strerror(errno));
        _exit(errno == ENOENT ? 127 : 126);
    }

    if (fcntl(control, F_SETFL, O_NONBLOCK) < 0)
        die("control descriptor");
    close(started[1]);
    struct pollfd fds[3] = {
        {.fd = sfd, .events = POLLIN},
        {.fd = control, .events = POLLIN},
        {.fd = started[0], .events = POLLIN},
    };
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
        /* Commands first: the manager writes `d` before it hangs up the dyno, so a
         * command that dies of the hang-up finds the dyno already detached. */
        if (fds[1].fd >= 0 && fds[1].revents) {
            char commands[64];
            ssize_t n;
            while ((n = read(control, commands, sizeof commands)) > 0) {
                for (ssize_t c = 0; c < n; c++) {
                    if (commands[c] == 'h') {
                        detached = 1;
                        if (!exec_done) {
                            /* Blocked in PROGRAM's process until its exec, then
                             * delivered; after the exec the manager's signals reach it. */
                            kill(main_pid, SIGHUP);
                            kill(main_pid, SIGCONT);
                        }
                    } else if (commands[c] == 't') {
                        signal_all(SIGTERM);
                    } else if (commands[c] == 'k') {
                        detached = 0;
                        signal_all(SIGKILL);
                    }
                }
            }
            if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
                /* The manager is gone: so is the dyno. */
                fds[1].fd = -1;
                detached = 0;
                signal_all(SIGKILL);
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
            if (pid == main_pid) {
                main_status = status;
                report_exit(status_fd, status);
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
