/*
 * dyno-init's parts, built together into one binary (gateway/manager/dyno_init.py):
 *   dyno_init.c           the reaper: control messages, starting the command, main()
 *   dyno_init_manager.c   the status pipe to the manager, and the words of its messages
 *   dyno_init_program.c   starting a program in the dyno (the command, entered processes)
 *   dyno_init_sandbox.c   the namespaces sandbox it builds as root (sandbox mode)
 *   dyno_init_sessions.c  processes entered into the running dyno, and connections
 *                         made from inside it for port forwarding
 *   dyno_init_network.c   the dyno's network: loopback, its veth pair (sandbox mode)
 */
#ifndef DYNO_INIT_H
#define DYNO_INIT_H

#define _GNU_SOURCE
#include <poll.h>
#include <sys/types.h>

/* dyno_init_manager.c */
extern int status_fd;  /* the status pipe; -1 until main() has it */
void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void die(const char *what) __attribute__((noreturn));
int parse_number(const char *text, long low, long high);
/* Words of a control packet: NUL-terminated, after its one-letter kind. */
int split_words(char *buf, size_t len, char **words, int room);

/* dyno_init_program.c */

/* A program to start: the command (once) or an entered process (any number). */
struct program {
    char **argv;
    char **envp;       /* NULL: the init's own environment */
    const int *stdio;  /* stdin, stdout, stderr; NULL: the init's own */
    int new_session;   /* setsid(): its own session and process group */
    int ctty;          /* and stdin, a terminal, as its controlling terminal */
    int sandboxed;     /* the namespaces sandbox: limits, /app, the dyno's user, seccomp */
};
pid_t start_program(const struct program *program, int control);

/* dyno_init_sandbox.c */
void parse_spec(int fd);
int spec_own_net(void);
int spec_veth(void);
void spec_build_network(int host);
void join_cgroups(void);
void build_root(void);
void become_dyno_user(void);
void enter_sandbox(void);

/* dyno_init_network.c */
int nl_open(void);
void build_network(int host, const char *veth_host, const char *host_addr,
                   const char *dyno_addr);

/* dyno_init_sessions.c */
enum { MAX_SESSIONS = 64 };
void enter_process(char *words_buf, size_t len, const int *fds, int n_fds, int control,
                   int sandboxed);
void connect_inside(char *words_buf, size_t len, const int *fds, int n_fds);
int session_poll_fds(struct pollfd *fds, int room);
void session_events(const struct pollfd *fds, int n);
int session_reaped(pid_t pid, int status);

#endif
