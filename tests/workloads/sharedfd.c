/* sharedfd STATUS [siblings]
 * The root clones a child with CLONE_FILES (not CLONE_VM): two processes, one
 * fd table. With "siblings" it clones a second such child ("child <pid>" for
 * each) and then unshares its own table: the two children share one table
 * that their parent no longer has. Both count ("count <pid> N" every 10 ms); the root reports
 * "child <pid>" and then "ready <pid>". SIGUSR1 makes a process open
 * /dev/null at fd 40 + (its role: 0 root, 1 child) and report "opened <pid> <fd>";
 * SIGUSR2 makes it report which of fds 40 and 41 it has: "has <pid> <a> <b>"
 * (1 = open). With one shared table, what one opens the other has. */
#include "wl.h"
#include <sched.h>

static volatile sig_atomic_t want_open, want_has;
static int role;

static void on_usr1(int sig) { (void)sig; want_open = 1; }
static void on_usr2(int sig) { (void)sig; want_has = 1; }

static void count_forever(void)
{
    uint64_t n = 0;
    pid_t me = getpid();
    for (;;) {
        if (want_open) {
            int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
            want_open = 0;
            if (fd < 0 || dup2(fd, 40 + role) < 0)
                wl_die("open /dev/null");
            close(fd);
            wl_report2("opened", (uint64_t)me, (uint64_t)(40 + role));
        }
        if (want_has) {
            struct wl_line l = {.len = 0};
            want_has = 0;
            wl_s(&l, "has");
            wl_u(&l, (uint64_t)me);
            wl_u(&l, fcntl(40, F_GETFD) >= 0);
            wl_u(&l, fcntl(41, F_GETFD) >= 0);
            wl_emit(&l);
        }
        n++;
        wl_report2("count", (uint64_t)me, n);
        wl_sleep_ms(10);
    }
}

int main(int argc, char **argv)
{
    long child;
    if (argc < 2)
        wl_die("usage: sharedfd STATUS");
    wl_status_open(argv[1], 1);
    wl_on_signal(SIGUSR1, on_usr1);
    wl_on_signal(SIGUSR2, on_usr2);
    /* fork-like clone (no new stack): the child goes on from here. */
    child = syscall(SYS_clone, CLONE_FILES | SIGCHLD, 0, 0, 0, 0);
    if (child < 0)
        wl_die("clone");
    if (child == 0) {
        role = 1;
        count_forever();
    }
    wl_report1("child", (uint64_t)child);
    if (argc > 2 && strcmp(argv[2], "siblings") == 0) {
        child = syscall(SYS_clone, CLONE_FILES | SIGCHLD, 0, 0, 0, 0);
        if (child < 0)
            wl_die("clone");
        if (child == 0) {
            role = 1;
            count_forever();
        }
        wl_report1("child", (uint64_t)child);
        if (unshare(CLONE_FILES) < 0)
            wl_die("unshare");
    }
    wl_ready();
    count_forever();
}
