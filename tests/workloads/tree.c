/* tree STATUS
 * Four processes: root -> {a, b}, a -> c (a grandchild). b moves into its own
 * process group. Each reports "proc <pid> <ppid> <pgid>" once, then counts:
 * "count <pid> N" every 10 ms. The root reports "ready <pid>" once all four
 * exist. Each process writes through its own O_APPEND description. */
#include "wl.h"
#include <sys/wait.h>

static int sync_w = -1;

static void count_forever(void)
{
    uint64_t n = 0;
    pid_t me = getpid();
    for (;;) {
        while (waitpid(-1, NULL, WNOHANG) > 0) /* reap a killed child at once */
            ;
        n++;
        wl_report2("count", (uint64_t)me, n);
        wl_sleep_ms(10);
    }
}

/* Announce this process and tell the root it exists. */
static void announce(void)
{
    pid_t me = getpid();
    struct wl_line l = {.len = 0};
    wl_s(&l, "proc");
    wl_u(&l, (uint64_t)me);
    wl_u(&l, (uint64_t)getppid());
    wl_u(&l, (uint64_t)getpgid(0));
    wl_emit(&l);
    if (write(sync_w, &me, sizeof(me)) != sizeof(me))
        wl_die("sync write");
    close(sync_w);
}

int main(int argc, char **argv)
{
    int p[2];
    pid_t a, b, got;
    int seen = 0;
    if (argc < 2)
        wl_die("usage: tree STATUS");
    wl_status_open(argv[1], 1);
    if (pipe2(p, O_CLOEXEC) < 0)
        wl_die("pipe");
    sync_w = p[1];

    a = fork();
    if (a == 0) {
        close(p[0]);
        wl_status_reopen_private();
        if (fork() == 0) {
            wl_status_reopen_private();
            announce();
            count_forever();
        }
        announce();
        count_forever();
    }
    b = fork();
    if (b == 0) {
        close(p[0]);
        wl_status_reopen_private();
        setpgid(0, 0);
        announce();
        count_forever();
    }
    setpgid(b, b); /* both sides, so the group exists whoever runs first */
    close(p[1]);
    while (seen < 3 && read(p[0], &got, sizeof(got)) == sizeof(got))
        seen++;
    close(p[0]);
    if (seen < 3)
        wl_die("a child did not start");
    {
        struct wl_line l = {.len = 0};
        wl_s(&l, "proc");
        wl_u(&l, (uint64_t)getpid());
        wl_u(&l, (uint64_t)getppid());
        wl_u(&l, (uint64_t)getpgid(0));
        wl_emit(&l);
    }
    wl_ready();
    count_forever();
}
