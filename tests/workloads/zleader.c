/* zleader STATUS
 * The main thread starts two threads and then leaves with pthread_exit: the
 * process goes on with a zombie thread-group leader (State Z) and two live
 * threads, each counting ("count <tid> N" every 10 ms). A thread reports
 * "ready <pid>" once /proc shows the leader as a zombie. SIGUSR1 (to the
 * process) is taken by whichever thread: "usr1 <tid>". SIGUSR2 ends the
 * process with exit_group(7). */
#include "wl.h"
#include <pthread.h>
#include <stdio.h>

#define NTHREADS 2

static pthread_barrier_t started;

static void on_usr1(int sig)
{
    (void)sig;
    wl_report1("usr1", (uint64_t)wl_gettid());
}

static void on_usr2(int sig)
{
    (void)sig;
    syscall(SYS_exit_group, 7);
}

static int leader_is_zombie(void)
{
    char path[64], buf[512];
    int fd, n;
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)getpid());
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    n = (int)read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    return p && p[1] == ' ' && p[2] == 'Z';
}

static void *count_forever(void *arg)
{
    uint64_t n = 0;
    pid_t tid = wl_gettid();
    pthread_barrier_wait(&started);
    if (arg) {
        while (!leader_is_zombie())
            wl_sleep_ms(1);
        wl_ready();
    }
    for (;;) {
        n++;
        wl_report2("count", (uint64_t)tid, n);
        wl_sleep_ms(10);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    pthread_t t;
    if (argc < 2)
        wl_die("usage: zleader STATUS");
    wl_status_open(argv[1], 0);
    wl_on_signal(SIGUSR1, on_usr1);
    wl_on_signal(SIGUSR2, on_usr2);
    pthread_barrier_init(&started, NULL, NTHREADS + 1);
    for (int i = 0; i < NTHREADS; i++)
        if (pthread_create(&t, NULL, count_forever, i == 0 ? (void *)1 : NULL) != 0)
            wl_die("pthread_create");
    pthread_barrier_wait(&started);
    pthread_exit(NULL);
}
