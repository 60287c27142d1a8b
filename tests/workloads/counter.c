/* counter STATUS [STEP_MS] [clock]
 * Counts in memory, one step every STEP_MS (default 10) ms, reporting
 * "count N" each step; a restored counter must go on from N, not from 0.
 * With "clock": "count N MS", MS its CLOCK_MONOTONIC in milliseconds (one
 * clock for the whole machine: the gap around a migration is its downtime).
 * SIGUSR1 runs a real handler that reports "usr1 N". */
#include "wl.h"

static volatile uint64_t counter;

static void on_usr1(int sig)
{
    (void)sig;
    wl_report1("usr1", counter);
}

int main(int argc, char **argv)
{
    long step_ms = argc > 2 ? atol(argv[2]) : 10;
    int clock = argc > 3 && strcmp(argv[3], "clock") == 0;
    if (argc < 2)
        wl_die("usage: counter STATUS [STEP_MS]");
    wl_status_open(argv[1], 0);
    wl_on_signal(SIGUSR1, on_usr1);
    wl_ready();
    for (;;) {
        counter++;
        if (clock)
            wl_report2("count", counter, wl_now_ms());
        else
            wl_report1("count", counter);
        wl_sleep_ms(step_ms);
    }
}
