/* orphan STATUS
 * The root (a session leader when started by the tests) forks a middle child
 * that forks a grandchild named "pycr-orphan" and exits at once: the
 * grandchild, still in the root's session, is re-parented outside the tree.
 * Root and grandchild count ("count <pid> N" every 10 ms); the root reports
 * "orphan <pid>" and then "ready <pid>" once the grandchild's parent is no
 * longer in the tree. */
#include "wl.h"
#include <sys/prctl.h>
#include <sys/wait.h>

static void count_forever(void)
{
    uint64_t n = 0;
    pid_t me = getpid();
    for (;;) {
        n++;
        wl_report2("count", (uint64_t)me, n);
        wl_sleep_ms(10);
    }
}

int main(int argc, char **argv)
{
    int p[2];
    pid_t mid, orphan;
    if (argc < 2)
        wl_die("usage: orphan STATUS");
    wl_status_open(argv[1], 1);
    if (pipe2(p, O_CLOEXEC) < 0)
        wl_die("pipe");
    mid = fork();
    if (mid == 0) {
        pid_t g = fork();
        if (g == 0) {
            close(p[0]);
            close(p[1]);
            prctl(PR_SET_NAME, "pycr-orphan");
            wl_status_reopen_private();
            while (getppid() == mid)   /* wait until re-parented */
                wl_sleep_ms(1);
            count_forever();
        }
        if (write(p[1], &g, sizeof(g)) != sizeof(g))
            _exit(1);
        _exit(0);
    }
    close(p[1]);
    if (read(p[0], &orphan, sizeof(orphan)) != sizeof(orphan))
        wl_die("no grandchild");
    close(p[0]);
    if (waitpid(mid, NULL, 0) != mid)
        wl_die("waitpid");
    wl_report1("orphan", (uint64_t)orphan);
    wl_ready();
    count_forever();
}
