/* mapper STATUS [STEP_MS]
 * Reshapes its address space every STEP_MS (default 20) ms: eight slots, each
 * empty or holding one anonymous region; step s works on slot s % 8 and, by a
 * hash of s, mmaps a new region (1-8 pages, filled from xorshift seeded by s),
 * munmaps it, mremaps it to a new size (MREMAP_MAYMOVE; the new tail filled),
 * flips it between read-write and read-only, or rewrites its content.
 * Everything is deterministic in s. Reports "step N" every step.
 * SIGUSR1: "regions <hexaddr>:<bytes>,..." (address order) then "sum <hex>",
 * the wl.h sum over those regions' bytes concatenated in that order.
 * SIGUSR2 toggles a pause of the stepping ("paused N" / "resumed N"), so
 * tests can compare the sum with the memory read from outside. */
#include "wl.h"
#include <sys/mman.h>

#define SLOTS 8
#define PAGE 4096

struct slot {
    unsigned char *addr;
    size_t len;
    int writable;
};

static struct slot slots[SLOTS];
static volatile sig_atomic_t want_sum, want_toggle;

static void on_usr1(int sig)
{
    (void)sig;
    want_sum = 1;
}

static void on_usr2(int sig)
{
    (void)sig;
    want_toggle = 1;
}

static uint64_t mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static void fill(unsigned char *p, size_t len, uint64_t seed)
{
    uint64_t st = mix(seed) | 1;
    for (size_t i = 0; i + 8 <= len; i += 8) {
        uint64_t v = wl_xorshift(&st);
        memcpy(p + i, &v, 8);
    }
}

static void set_writable(struct slot *sl, int w)
{
    if (mprotect(sl->addr, sl->len, w ? PROT_READ | PROT_WRITE : PROT_READ) < 0)
        wl_die("mprotect");
    sl->writable = w;
}

static void step(uint64_t s)
{
    struct slot *sl = &slots[s % SLOTS];
    uint64_t h = mix(s);
    if (!sl->addr) {
        sl->len = (1 + h % 8) * PAGE;
        sl->addr = mmap(NULL, sl->len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (sl->addr == MAP_FAILED)
            wl_die("mmap");
        sl->writable = 1;
        fill(sl->addr, sl->len, s);
        if ((h >> 8) & 1)
            set_writable(sl, 0);
        return;
    }
    switch ((h >> 16) % 4) {
    case 0:
        if (munmap(sl->addr, sl->len) < 0)
            wl_die("munmap");
        sl->addr = NULL;
        sl->len = 0;
        break;
    case 1: {
        size_t newlen = (1 + (h >> 24) % 16) * PAGE;
        int was_writable = sl->writable;
        void *p = mremap(sl->addr, sl->len, newlen, MREMAP_MAYMOVE);
        if (p == MAP_FAILED)
            wl_die("mremap");
        size_t old = sl->len;
        sl->addr = p;
        sl->len = newlen;
        if (newlen > old) {
            if (!was_writable)
                set_writable(sl, 1);
            fill(sl->addr + old, newlen - old, s);
            if (!was_writable)
                set_writable(sl, 0);
        }
        break;
    }
    case 2:
        set_writable(sl, !sl->writable);
        break;
    case 3: {
        int was_writable = sl->writable;
        if (!was_writable)
            set_writable(sl, 1);
        fill(sl->addr, sl->len, s);
        if (!was_writable)
            set_writable(sl, 0);
        break;
    }
    }
}

static void report_sum(void)
{
    struct slot *order[SLOTS];
    int n = 0;
    struct wl_sum sum;
    struct wl_line l = {.len = 0};
    for (int i = 0; i < SLOTS; i++)
        if (slots[i].addr)
            order[n++] = &slots[i];
    for (int i = 1; i < n; i++) /* insertion sort by address */
        for (int j = i; j > 0 && order[j - 1]->addr > order[j]->addr; j--) {
            struct slot *t = order[j];
            order[j] = order[j - 1];
            order[j - 1] = t;
        }
    wl_s(&l, "regions ");
    wl_sum_init(&sum);
    for (int i = 0; i < n; i++) {
        if (i)
            wl_s(&l, ",");
        wl_x(&l, (uint64_t)(uintptr_t)order[i]->addr);
        wl_s(&l, ":");
        wl_u(&l, order[i]->len);
        wl_sum_update(&sum, order[i]->addr, order[i]->len);
    }
    wl_emit(&l);
    wl_s(&l, "sum");
    wl_x(&l, wl_sum_final(&sum));
    wl_emit(&l);
}

int main(int argc, char **argv)
{
    long step_ms = argc > 2 ? atol(argv[2]) : 20;
    uint64_t s = 0;
    int paused = 0;
    if (argc < 2)
        wl_die("usage: mapper STATUS [STEP_MS]");
    wl_status_open(argv[1], 0);
    wl_on_signal(SIGUSR1, on_usr1);
    wl_on_signal(SIGUSR2, on_usr2);
    for (s = 0; s < SLOTS; s++) /* start with every slot filled */
        step(s);
    wl_ready();
    for (;;) {
        if (want_sum) {
            want_sum = 0;
            report_sum();
        }
        if (want_toggle) {
            want_toggle = 0;
            paused = !paused;
            wl_report1(paused ? "paused" : "resumed", s);
        }
        if (!paused) {
            step(s);
            wl_report1("step", s);
            s++;
        }
        wl_sleep_ms(step_ms);
    }
}
