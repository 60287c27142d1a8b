/* A small process tree for the demo: a parent and two children, each counting
 * once per 200 ms into its own line of a log file, so you can watch them stop
 * at the checkpoint and go on, with the same numbers, after the restore. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static void count_forever(int fd, const char *who)
{
    unsigned long n = 0;
    struct timespec step = { 0, 200 * 1000 * 1000 };
    char line[128];
    for (;;) {
        int len = snprintf(line, sizeof line, "%s pid %d count %lu\n", who, getpid(), n++);
        if (write(fd, line, len) < 0)
            return;
        nanosleep(&step, NULL);
    }
}

int main(int argc, char **argv)
{
    int fd = 1;   /* the log: stdout, redirected by the demo */
    (void)argc; (void)argv;
    for (int i = 0; i < 2; i++) {
        pid_t pid = fork();
        if (pid == 0) {
            count_forever(fd, i ? "child-b" : "child-a");
            _exit(0);
        }
    }
    count_forever(fd, "parent ");
    return 0;
}
