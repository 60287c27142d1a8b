/* execer STATUS [DELAY_MS] [TARGET]
 * Counts like counter ("count N" every 10 ms) and, after DELAY_MS (default
 * 1000; 0 = never by itself) or on SIGUSR2, reports "exec <pid>" and execs
 * TARGET (default: the counter next to this binary) with the same status
 * description passed as "fd:N", so the new program appends where this one
 * stopped and reports "ready <pid>" again with the same pid. */
#include "wl.h"
#include <libgen.h>
#include <stdio.h>
#include <limits.h>

static volatile sig_atomic_t want_exec;

static void on_usr2(int sig)
{
    (void)sig;
    want_exec = 1;
}

int main(int argc, char **argv)
{
    long delay_ms = argc > 2 ? atol(argv[2]) : 1000;
    char target[PATH_MAX], fdarg[32];
    uint64_t n = 0, deadline;
    if (argc < 2)
        wl_die("usage: execer STATUS [DELAY_MS] [TARGET]");
    if (argc > 3) {
        snprintf(target, sizeof(target), "%s", argv[3]);
    } else {
        char self[PATH_MAX];
        ssize_t len = readlink("/proc/self/exe", self, sizeof(self) - 1);
        if (len < 0)
            wl_die("readlink /proc/self/exe");
        self[len] = 0;
        snprintf(target, sizeof(target), "%s/counter", dirname(self));
    }
    wl_status_open(argv[1], 0);
    wl_on_signal(SIGUSR2, on_usr2);
    wl_ready();
    deadline = wl_now_ms() + (uint64_t)delay_ms;
    for (;;) {
        if (want_exec || (delay_ms > 0 && wl_now_ms() >= deadline))
            break;
        n++;
        wl_report1("count", n);
        wl_sleep_ms(10);
    }
    wl_report1("exec", (uint64_t)getpid());
    if (wl_status_fd > 2) {
        if (fcntl(wl_status_fd, F_SETFD, 0) < 0)
            wl_die("fcntl");
        snprintf(fdarg, sizeof(fdarg), "fd:%d", wl_status_fd);
    } else {
        snprintf(fdarg, sizeof(fdarg), "-");
    }
    char *args[] = {target, fdarg, NULL};
    execv(target, args);
    wl_die("execv");
}
