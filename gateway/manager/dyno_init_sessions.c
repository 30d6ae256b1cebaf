/*
 * Into a running dyno (docs/exec.md): processes the init forks on the manager's behalf
 * (`ssh APP.run.N`, sftp), and TCP connections it makes from inside the dyno's network
 * for port forwarding. The init is already in every namespace, the cgroup and the root
 * of the dyno, as its user: a child of it is inside, and a socket it opens is in the
 * dyno's network namespace.
 *
 * An entered process: the `E` packet carries its stdio and a SEQPACKET socket of its
 * own, its session socket, on which the init says "pid N" (the process's pid inside the
 * dyno) or "error TEXT", and later "exit STATUS" (its raw wait status) before closing
 * it. The manager writes "sSIGNUM" on it to signal the process's group; closing it is
 * the client's hang-up (SIGHUP and SIGCONT to that group). Each entered process leads a
 * session of its own; it ends with the dyno, whose end kills every process in it.
 *
 * A connection: the `C` packet carries ADDRESS and PORT (a loopback address: the dyno's
 * own) and a socket to answer on: "ok" with the connecting socket (non-blocking: the
 * manager's side learns the outcome when it becomes writable), or "error TEXT".
 */
#include "dyno_init.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

struct session {
    int sock;   /* the session socket, -1 once closed */
    pid_t pid;  /* the entered process until reaped, else 0 */
};

static struct session sessions[MAX_SESSIONS];
static int initialized;

static void answer(int sock, const char *text, int fd) {
    char control_buf[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {.iov_base = (void *)text, .iov_len = strlen(text)};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (fd >= 0) {
        memset(control_buf, 0, sizeof control_buf);
        msg.msg_control = control_buf;
        msg.msg_controllen = sizeof control_buf;
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof(int));
    }
    if (sendmsg(sock, &msg, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) {
        /* The manager's side is gone: it no longer waits for this answer. */
    }
}

static void close_all(const int *fds, int n) {
    for (int i = 0; i < n; i++)
        close(fds[i]);
}

static struct session *free_slot(void) {
    if (!initialized) {
        for (int i = 0; i < MAX_SESSIONS; i++)
            sessions[i] = (struct session){.sock = -1, .pid = 0};
        initialized = 1;
    }
    for (int i = 0; i < MAX_SESSIONS; i++)
        if (sessions[i].sock < 0 && sessions[i].pid == 0)
            return &sessions[i];
    return NULL;
}

/* E: "pty" or "pipes", ARGC, ARGV..., ENV...; stdin, stdout, stderr, the session socket. */
void enter_process(char *buf, size_t len, const int *fds, int n_fds, int control,
                   int sandboxed) {
    static char *words[8192], *argv[8192];
    if (n_fds != 4) {
        dprintf(2, "dyno-init: an enter message with %d descriptors\n", n_fds);
        close_all(fds, n_fds);
        return;
    }
    int sock = fds[3];
    struct session *slot = free_slot();
    int count = split_words(buf, len, words, 8190);
    int argc = count >= 2 ? atoi(words[1]) : 0;
    char error[128] = "";
    if (argc < 1 || 2 + argc > count)
        snprintf(error, sizeof error, "error a bad enter message");
    else if (slot == NULL)
        snprintf(error, sizeof error, "error this dyno already has %d sessions, the most it may",
                 MAX_SESSIONS);
    if (error[0] != '\0') {
        answer(sock, error, -1);
        close_all(fds, 4);
        return;
    }
    for (int i = 0; i < argc; i++)
        argv[i] = words[2 + i];
    argv[argc] = NULL;
    words[count] = NULL;  /* the environment follows the argv */
    int pty = strcmp(words[0], "pty") == 0;
    struct program program = {.argv = argv, .envp = &words[2 + argc], .stdio = fds,
                              .new_session = 1, .ctty = pty, .sandboxed = sandboxed};
    pid_t pid = start_program(&program, control);
    close_all(fds, 3);
    if (pid < 0) {
        char text[128];
        snprintf(text, sizeof text, "error fork: %s", strerror(errno));
        answer(sock, text, -1);
        close(sock);
        return;
    }
    char text[32];
    snprintf(text, sizeof text, "pid %d", pid);
    answer(sock, text, -1);
    *slot = (struct session){.sock = sock, .pid = pid};
}

int session_poll_fds(struct pollfd *fds, int room) {
    int n = 0;
    for (int i = 0; i < MAX_SESSIONS && initialized && n < room; i++)
        if (sessions[i].sock >= 0)
            fds[n++] = (struct pollfd){.fd = sessions[i].sock, .events = POLLIN};
    return n;
}

/* What the manager said on session sockets: a signal for the process's group, or its
 * hang-up (EOF). Read by descriptor, so a slot reused since the poll is read afresh. */
void session_events(const struct pollfd *fds, int n) {
    for (int i = 0; i < n; i++) {
        if (!fds[i].revents)
            continue;
        for (int s = 0; s < MAX_SESSIONS; s++) {
            struct session *session = &sessions[s];
            if (session->sock != fds[i].fd)
                continue;
            char packet[16];
            ssize_t got = recv(session->sock, packet, sizeof packet - 1, MSG_DONTWAIT);
            if (got > 1 && packet[0] == 's') {
                packet[got] = '\0';
                int sig = atoi(packet + 1);
                if (sig > 0 && sig < NSIG && session->pid > 0)
                    kill(-session->pid, sig);
            } else if (got == 0 || (got < 0 && errno != EAGAIN && errno != EINTR)) {
                if (session->pid > 0) {
                    kill(-session->pid, SIGHUP);
                    kill(-session->pid, SIGCONT);
                }
                close(session->sock);
                session->sock = -1;
            }
            break;
        }
    }
}

/* An entered process ended: its status to the manager, and its session socket closed.
 * Returns whether `pid` was one. */
int session_reaped(pid_t pid, int status) {
    for (int s = 0; s < MAX_SESSIONS && initialized; s++) {
        struct session *session = &sessions[s];
        if (session->pid != pid)
            continue;
        if (session->sock >= 0) {
            char text[32];
            snprintf(text, sizeof text, "exit %d", status);
            answer(session->sock, text, -1);
            close(session->sock);
        }
        *session = (struct session){.sock = -1, .pid = 0};
        return 1;
    }
    return 0;
}

/* C: ADDRESS, PORT; the socket to answer on. Only loopback addresses: the dyno's own. */
void connect_inside(char *buf, size_t len, const int *fds, int n_fds) {
    if (n_fds != 1) {
        close_all(fds, n_fds);
        return;
    }
    int reply = fds[0];
    char *words[3];
    int count = split_words(buf, len, words, 3);
    struct sockaddr_in v4 = {.sin_family = AF_INET};
    struct sockaddr_in6 v6 = {.sin6_family = AF_INET6};
    struct sockaddr *address = NULL;
    socklen_t size = 0;
    long port = count == 2 ? strtol(words[1], NULL, 10) : 0;
    if (count == 2 && port > 0 && port < 65536) {
        if (inet_pton(AF_INET, words[0], &v4.sin_addr) == 1 &&
            (ntohl(v4.sin_addr.s_addr) >> 24) == 127) {
            v4.sin_port = htons((uint16_t)port);
            address = (struct sockaddr *)&v4, size = sizeof v4;
        } else if (inet_pton(AF_INET6, words[0], &v6.sin6_addr) == 1 &&
                   IN6_IS_ADDR_LOOPBACK(&v6.sin6_addr)) {
            v6.sin6_port = htons((uint16_t)port);
            address = (struct sockaddr *)&v6, size = sizeof v6;
        }
    }
    if (address == NULL) {
        answer(reply, "error only a loopback address and a port", -1);
        close(reply);
        return;
    }
    int sock = socket(address->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (sock >= 0 && (connect(sock, address, size) == 0 || errno == EINPROGRESS)) {
        answer(reply, "ok", sock);
    } else {
        char text[128];
        snprintf(text, sizeof text, "error %s", strerror(errno));
        answer(reply, text, -1);
    }
    if (sock >= 0)
        close(sock);
    close(reply);
}
