/* bigmem STATUS [MIB] [--dirty-pct-per-sec P] [--seed S] [--report-ms MS]
 * Maps MIB (default 256) MiB of private anonymous memory, fills it from a
 * seeded xorshift64 and reports "region <hexaddr> <bytes>" then "ready <pid>".
 * SIGUSR1: reports "sum <hex>" over the whole region (see wl.h for the sum).
 * With P > 0 it rewrites one word in P% of the region's pages per second
 * (pages picked by the PRNG), in 10 ms steps, and reports "dirtied <total>"
 * every MS ms (default 1000; at most once a step): the load for pre-dump and
 * migration. Two new reports mean pages were written after the first. */
#include "wl.h"
#include <sys/mman.h>

static volatile sig_atomic_t want_sum;

static void on_usr1(int sig)
{
    (void)sig;
    want_sum = 1;
}

int main(int argc, char **argv)
{
    uint64_t mib = 256, seed = 0x9e3779b97f4a7c15ull, state, npages, dirtied = 0;
    double pct = 0, owed = 0;
    uint64_t *words;
    size_t size, nwords;
    unsigned char *region;
    uint64_t next_report, report_ms = 1000;
    int positional = 0;

    if (argc < 2)
        wl_die("usage: bigmem STATUS [MIB] [--dirty-pct-per-sec P] [--seed S] [--report-ms MS]");
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--dirty-pct-per-sec") == 0 && i + 1 < argc)
            pct = atof(argv[++i]);
        else if (strcmp(argv[i], "--seed") == 0 && i + 1 < argc)
            seed = strtoull(argv[++i], NULL, 0);
        else if (strcmp(argv[i], "--report-ms") == 0 && i + 1 < argc)
            report_ms = strtoull(argv[++i], NULL, 0);
        else if (positional++ == 0)
            mib = strtoull(argv[i], NULL, 0);
        else
            wl_die("bigmem: unexpected argument");
    }
    wl_status_open(argv[1], 0);
    wl_on_signal(SIGUSR1, on_usr1);

    size = (size_t)mib << 20;
    region = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED)
        wl_die("mmap region");
    words = (uint64_t *)region;
    nwords = size / 8;
    state = seed ? seed : 1;
    for (size_t i = 0; i < nwords; i++)
        words[i] = wl_xorshift(&state);
    npages = size / 4096;

    {
        struct wl_line l = {.len = 0};
        wl_s(&l, "region");
        wl_x(&l, (uint64_t)(uintptr_t)region);
        wl_u(&l, size);
        wl_emit(&l);
    }
    wl_ready();

    next_report = wl_now_ms() + report_ms;
    for (;;) {
        if (want_sum) {
            struct wl_sum s;
            want_sum = 0;
            wl_sum_init(&s);
            wl_sum_update(&s, region, size);
            struct wl_line l = {.len = 0};
            wl_s(&l, "sum");
            wl_x(&l, wl_sum_final(&s));
            wl_emit(&l);
        }
        if (pct > 0 && npages) {
            owed += (double)npages * pct / 100.0 / 100.0; /* per 10 ms step */
            while (owed >= 1.0) {
                uint64_t r = wl_xorshift(&state);
                uint64_t page = r % npages;
                words[page * 512 + (r >> 32) % 512] = r;
                dirtied++;
                owed -= 1.0;
            }
            if (wl_now_ms() >= next_report) {
                wl_report1("dirtied", dirtied);
                next_report += report_ms;
            }
        }
        wl_sleep_ms(10);
    }
}
