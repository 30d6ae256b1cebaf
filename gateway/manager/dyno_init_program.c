/*
 * Starting a program in the dyno: the command (dyno_init.c) or a process entered into
 * the running dyno (dyno_init_sessions.c), with its stdio, session, terminal and, in
 * the namespaces sandbox, the dyno's limits and user (dyno_init_sandbox.c).
 */
#include "dyno_init.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

pid_t start_program(const struct program *program, int control) {
    pid_t pid = fork();
    if (pid != 0)
        return pid;
    /* Every signal back at its default, still blocked until the exec. */
    struct sigaction dfl = {.sa_handler = SIG_DFL};
    for (int s = 1; s < NSIG; s++)
        sigaction(s, &dfl, NULL);  /* fails harmlessly for KILL, STOP and RT gaps */
    close(control);
    const int *stdio = program->stdio;
    if (stdio != NULL) {
        for (int i = 0; i < 3; i++)
            if (dup2(stdio[i], i) < 0)
                die("stdio");
        for (int i = 0; i < 3; i++)
            if (stdio[i] > 2)
                close(stdio[i]);
    }
    if (program->new_session && setsid() < 0)
        die("setsid");
    if (program->ctty && ioctl(0, TIOCSCTTY, 0) < 0)
        die("TIOCSCTTY");
    if (program->sandboxed)
        enter_sandbox();
    umask(022);  /* sshd's, not the manager's private 077 */
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);  /* what waited is delivered now */
    char **argv = program->argv;
    if (program->envp != NULL)
        execvpe(argv[0], argv, program->envp);
    else
        execvp(argv[0], argv);
    dprintf(2, "dyno-init: %s: %s\n", argv[0], strerror(errno));
    _exit(errno == ENOENT ? 127 : 126);
}
