/* joiner STATUS
 * The main thread starts three named workers ("worker-0".."worker-2"); worker 1
 * runs on an alternate signal stack. Each worker counts ("count <tid> N") until
 * SIGUSR1, then exits; the main thread joins every worker and reports
 * "joined <n>". pthread_join waits on the futex the kernel clears at thread
 * exit (set_tid_address), so a restore that loses it hangs here. SIGUSR2 is
 * handled on the alternate stack by worker 1, which reports "altstack <0|1>". */
#define _GNU_SOURCE
#include <stdio.h>
#include "wl.h"
#include <pthread.h>

#define NWORKERS 3

static volatile sig_atomic_t stop;
static pthread_barrier_t started;
static char altstack[65536];
static volatile uint64_t on_alt;

static void on_usr1(int sig)
{
    (void)sig;
    stop = 1;
}

static void on_usr2(int sig)
{
    char here;
    (void)sig;
    on_alt = (&here >= altstack && &here < altstack + sizeof altstack);
}

static void *work(void *arg)
{
    long i = (long)arg;
    char name[16];
    uint64_t n = 0;
    pid_t tid = wl_gettid();
    sigset_t usr2;

    snprintf(name, sizeof name, "worker-%ld", i);
    pthread_setname_np(pthread_self(), name);
    sigemptyset(&usr2);
    sigaddset(&usr2, SIGUSR2);
    if (i == 1) {
        stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack, .ss_flags = 0};
        if (sigaltstack(&ss, NULL) < 0)
            wl_die("sigaltstack");
        pthread_sigmask(SIG_UNBLOCK, &usr2, NULL);
    } else {
        pthread_sigmask(SIG_BLOCK, &usr2, NULL);
    }
    wl_report1("thread", (uint64_t)tid);
    pthread_barrier_wait(&started);
    while (!stop) {
        n++;
        wl_report2("count", (uint64_t)tid, n);
        if (i == 1 && on_alt) {
            wl_report1("altstack", on_alt);
            on_alt = 0;
        }
        wl_sleep_ms(10);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    pthread_t t[NWORKERS];
    sigset_t usr2;
    struct sigaction sa = {.sa_handler = on_usr2, .sa_flags = SA_ONSTACK | SA_RESTART};

    if (argc < 2)
        wl_die("usage: joiner STATUS");
    wl_status_open(argv[1], 0);
    wl_on_signal(SIGUSR1, on_usr1);
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGUSR2, &sa, NULL) < 0)
        wl_die("sigaction");
    sigemptyset(&usr2);
    sigaddset(&usr2, SIGUSR2);
    pthread_sigmask(SIG_BLOCK, &usr2, NULL);      /* only worker 1 takes SIGUSR2 */
    pthread_barrier_init(&started, NULL, NWORKERS + 1);
    for (long i = 0; i < NWORKERS; i++)
        if (pthread_create(&t[i], NULL, work, (void *)i) != 0)
            wl_die("pthread_create");
    pthread_barrier_wait(&started);
    wl_ready();
    for (int i = 0; i < NWORKERS; i++)
        pthread_join(t[i], NULL);
    wl_report1("joined", NWORKERS);
    for (;;)
        wl_sleep_ms(1000);
}
