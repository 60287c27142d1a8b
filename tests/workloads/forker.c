/* forker STATUS
 * The parent forks a short-lived worker every 200 ms and reports
 * "fork <pid>"; each worker counts ("count <pid> N" every 50 ms) and exits
 * after 500 ms; the parent reaps it with waitpid and reports "exit <pid> <code>" (code is
 * the exit status, or 128 + the signal).
 * Workers exit with status 0 and write through their own O_APPEND description. */
#include "wl.h"
#include <sys/wait.h>

static void worker(void)
{
    uint64_t end = wl_now_ms() + 500, n = 0;
    pid_t me = getpid();
    wl_status_reopen_private();
    while (wl_now_ms() < end) {
        n++;
        wl_report2("count", (uint64_t)me, n);
        wl_sleep_ms(50);
    }
    _exit(0);
}

int main(int argc, char **argv)
{
    uint64_t next_fork;
    if (argc < 2)
        wl_die("usage: forker STATUS");
    wl_status_open(argv[1], 1);
    wl_ready();
    next_fork = wl_now_ms();
    for (;;) {
        pid_t pid;
        int status;
        while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
            wl_report2("exit", (uint64_t)pid, WIFEXITED(status) ? (uint64_t)WEXITSTATUS(status) : 128 + (uint64_t)WTERMSIG(status));
        if (wl_now_ms() >= next_fork) {
            pid = fork();
            if (pid == 0)
                worker();
            if (pid > 0)
                wl_report1("fork", (uint64_t)pid);
            next_fork = wl_now_ms() + 200; /* no catch-up burst after a long stop */
        }
        wl_sleep_ms(10);
    }
}
