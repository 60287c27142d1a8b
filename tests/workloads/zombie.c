/* zombie STATUS [CODE|sig:N ...]
 * Forks one child per argument (default: 42 and sig:15): the child exits with
 * CODE, or dies of signal N. The parent does not reap them: it waits until
 * each is dead (waitid WNOWAIT) and reports "zombie <pid>", then "ready <pid>",
 * then counts ("count N" every 10 ms). On SIGUSR1 it reaps every child it can:
 * "reaped <pid> exited <code>" / "reaped <pid> signaled <sig>", then
 * "reaped none <errno>" once waitpid has nothing (ECHILD = 10), and "chld N",
 * the number of SIGCHLDs its handler has seen. */
#include "wl.h"
#include <sys/wait.h>

static volatile sig_atomic_t want_reap, chld_seen;

static void on_usr1(int sig)
{
    (void)sig;
    want_reap = 1;
}

static void on_chld(int sig)
{
    (void)sig;
    chld_seen++;
}

static void reap_all(void)
{
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        struct wl_line l = {.len = 0};
        if (pid <= 0) {
            wl_s(&l, "reaped none");
            wl_u(&l, pid < 0 ? (uint64_t)errno : 0);
            wl_emit(&l);
            break;
        }
        wl_s(&l, "reaped");
        wl_u(&l, (uint64_t)pid);
        if (WIFEXITED(status)) {
            wl_s(&l, " exited");
            wl_u(&l, (uint64_t)WEXITSTATUS(status));
        } else {
            wl_s(&l, " signaled");
            wl_u(&l, (uint64_t)WTERMSIG(status));
        }
        wl_emit(&l);
    }
    wl_report1("chld", (uint64_t)chld_seen);
}

int main(int argc, char **argv)
{
    const char *defaults[] = {"42", "sig:15"};
    const char **codes = argc > 2 ? (const char **)argv + 2 : defaults;
    int n = argc > 2 ? argc - 2 : 2;
    uint64_t count = 0;
    if (argc < 2)
        wl_die("usage: zombie STATUS [CODE|sig:N ...]");
    wl_status_open(argv[1], 1);
    wl_on_signal(SIGUSR1, on_usr1);
    wl_on_signal(SIGCHLD, on_chld);
    for (int i = 0; i < n; i++) {
        siginfo_t info;
        pid_t pid = fork();
        if (pid < 0)
            wl_die("fork");
        if (pid == 0) {
            if (strncmp(codes[i], "sig:", 4) == 0) {
                int sig = atoi(codes[i] + 4);
                signal(sig, SIG_DFL);
                raise(sig);
                _exit(99);
            }
            _exit(atoi(codes[i]));
        }
        memset(&info, 0, sizeof(info));
        while (waitid(P_PID, (id_t)pid, &info, WEXITED | WNOWAIT) < 0)
            if (errno != EINTR)
                wl_die("waitid");
        wl_report1("zombie", (uint64_t)pid);
    }
    wl_ready();
    for (;;) {
        if (want_reap) {
            want_reap = 0;
            reap_all();
        }
        count++;
        wl_report1("count", count);
        wl_sleep_ms(10);
    }
}
