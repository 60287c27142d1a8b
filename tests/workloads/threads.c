/* threads STATUS
 * One process, four threads (the main thread and three more); each counts its
 * own counter every 10 ms and reports "count <tid> N". Each thread reports
 * "thread <tid>" when it starts; "ready <pid>" follows once all four run. */
#include "wl.h"
#include <pthread.h>

#define NTHREADS 4

static pthread_barrier_t started;

static void *count_forever(void *arg)
{
    uint64_t n = 0;
    pid_t tid = wl_gettid();
    (void)arg;
    wl_report1("thread", (uint64_t)tid);
    pthread_barrier_wait(&started);
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
        wl_die("usage: threads STATUS");
    wl_status_open(argv[1], 0);
    pthread_barrier_init(&started, NULL, NTHREADS);
    for (int i = 0; i < NTHREADS - 1; i++)
        if (pthread_create(&t, NULL, count_forever, NULL) != 0)
            wl_die("pthread_create");
    /* The main thread joins the count once the others are running. */
    {
        pid_t tid = wl_gettid();
        uint64_t n = 0;
        wl_report1("thread", (uint64_t)tid);
        pthread_barrier_wait(&started);
        wl_ready();
        for (;;) {
            n++;
            wl_report2("count", (uint64_t)tid, n);
            wl_sleep_ms(10);
        }
    }
}
