/*
 * dyno-init's side of talking with the manager: the status pipe it writes lines to
 * ("pid N", "ready", "exit STATUS", "error TEXT": dyno_init.c says when), and the words
 * of the manager's messages (numbers in arguments, NUL-separated words in packets).
 */
#include "dyno_init.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int status_fd = -1;

/* One line on the status pipe for the manager. */
void say(const char *fmt, ...) {
    char line[512];
    va_list args;
    va_start(args, fmt);
    int len = vsnprintf(line, sizeof line, fmt, args);
    va_end(args);
    if (status_fd >= 0 && len > 0 && write(status_fd, line, (size_t)len) < 0) {
        /* The manager may be gone; the control socket tells us so. */
    }
}

void die(const char *what) {
    char text[400];
    snprintf(text, sizeof text, "%s: %s", what, strerror(errno));
    dprintf(2, "dyno-init: %s\n", text);
    say("error %s\n", text);
    _exit(125);
}

int parse_number(const char *text, long low, long high) {
    char *end;
    long value = strtol(text, &end, 10);
    if (*text == '\0' || *end != '\0' || value < low || value > high) {
        dprintf(2, "dyno-init: bad number %s\n", text);
        _exit(125);
    }
    return (int)value;
}

int split_words(char *buf, size_t len, char **words, int room) {
    int count = 0;
    for (char *p = buf; p < buf + len && count < room; p += strlen(p) + 1)
        words[count++] = p;
    return count;
}
