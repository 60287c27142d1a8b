/* pagewriter STATUS MIB PCT
 * Maps MIB MiB of private anonymous memory and rewrites PCT % of its pages a second (in
 * 10 ms steps, time it did not run not owed), page after page in order: write number w
 * rewrites all of page w % npages from (page, generation). So after W writes page p holds
 * generation W / npages + (p < W % npages), and every one of its words is known.
 * Reports "ready <pid>", "writes W" every second, and on SIGUSR1 checks every page against
 * that rule: "verified W" (all pages right), or "bad <page> <word> <W>" (the first wrong one:
 * a page lost, zeroed or stale in a copy of this memory). */
#include "wl.h"
#include <sys/mman.h>

static volatile sig_atomic_t want_check;

static void on_usr1(int sig)
{
    (void)sig;
    want_check = 1;
}

static uint64_t word_of(uint64_t page, uint64_t gen, uint64_t i)
{
    uint64_t x = (page + 1) * 0x9e3779b97f4a7c15ull ^ (gen + 1) * 0xbf58476d1ce4e5b9ull ^ i * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static void fill(uint64_t *words, uint64_t page, uint64_t gen)
{
    for (uint64_t i = 0; i < 512; i++)
        words[page * 512 + i] = word_of(page, gen, i);
}

int main(int argc, char **argv)
{
    uint64_t mib, npages, writes = 0, next_report;
    double pct, owed = 0;
    uint64_t *words;

    if (argc < 4)
        wl_die("usage: pagewriter STATUS MIB PCT");
    wl_status_open(argv[1], 1);
    wl_on_signal(SIGUSR1, on_usr1);
    mib = strtoull(argv[2], NULL, 0);
    pct = atof(argv[3]);
    npages = (mib << 20) / 4096;
    words = mmap(NULL, mib << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (words == MAP_FAILED)
        wl_die("mmap region");
    for (uint64_t p = 0; p < npages; p++)
        fill(words, p, 0);
    wl_ready();
    next_report = wl_now_ms() + 1000;
    for (;;) {
        if (want_check) {
            uint64_t full = writes / npages, part = writes % npages, bad_page = npages, bad_word = 0;
            want_check = 0;
            for (uint64_t p = 0; p < npages && bad_page == npages; p++) {
                uint64_t gen = full + (p < part);
                for (uint64_t i = 0; i < 512; i++)
                    if (words[p * 512 + i] != word_of(p, gen, i)) {
                        bad_page = p;
                        bad_word = i;
                        break;
                    }
            }
            if (bad_page == npages) {
                wl_report1("verified", writes);
            } else {
                struct wl_line l = {.len = 0};
                wl_s(&l, "bad");
                wl_u(&l, bad_page);
                wl_u(&l, bad_word);
                wl_u(&l, writes);
                wl_emit(&l);
            }
        }
        owed += (double)npages * pct / 100.0 / 100.0;     /* per 10 ms step */
        while (owed >= 1.0) {
            uint64_t page = writes % npages;
            fill(words, page, writes / npages + 1);
            writes++;
            owed -= 1.0;
        }
        if (wl_now_ms() >= next_report) {
            wl_report1("writes", writes);
            next_report = wl_now_ms() + 1000;
        }
        wl_sleep_ms(10);
    }
}
