/*
 * Network-migration workload: anonymous memory written at an exact rate, with a heartbeat
 * that measures the program's own downtime.
 *
 *   dirtier MIB RATE_PCT [TOUCH]
 *
 * MIB          MiB of anonymous memory, filled with incompressible bytes at start.
 * RATE_PCT     percent of the pages written per second, spread over 1 ms ticks (each write
 *              changes one word of the next page in order, so every write dirties one page).
 *              Time the program did not run (frozen) is not owed: no burst after a migration.
 * TOUCH        1: after SIGUSR1 arms it, the first gap in its ticks after which it is another
 *              task (its start time in /proc/self/stat changed: it was restored) makes it read
 *              one word of every page at once, as fast as it can, and print "touched BYTES NS".
 *              A gap's length cannot tell: the freezes of pre-copy passes can outlast a switch.
 *              0 (default): never.
 *
 * Lines on stdout (open it with O_APPEND), times from CLOCK_MONOTONIC in ns:
 *   ready PID
 *   hb NOW WRITES          every 100 ms: it runs; WRITES pages written so far
 *   gap FROM TO            two ticks more than 5 ms apart: the program did not run in between
 *   touched BYTES NS       see TOUCH (the gap line comes first; the read is not a gap)
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define TICK_NS 1000000L      /* 1 ms */
#define GAP_NS 5000000L       /* a gap worth a line */
#define HB_NS 100000000L      /* heartbeat every 100 ms */

static volatile sig_atomic_t armed;

static void on_usr1(int sig) { (void)sig; armed = 1; }

static uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

/* This task's start time (clock ticks after boot), -1 when /proc cannot tell: a restored
 * replica is a task born at its restore, whatever its PID. */
static long long start_time(void)
{
    char buf[1024];
    FILE *f = fopen("/proc/self/stat", "re");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    long long value = -1;
    /* after "comm)": state is field 3, starttime field 22 */
    for (int field = 3; p && field <= 22; field++) {
        p = strchr(p + 1, ' ');
        if (p && field == 22)
            value = strtoll(p + 1, NULL, 10);
    }
    return value;
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    char line[128];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n > 0 && write(1, line, (size_t)n) < 0)
        _exit(3);
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s MIB RATE_PCT [TOUCH_GAP_MS]\n", argv[0]);
        return 1;
    }
    size_t bytes = strtoul(argv[1], NULL, 10) << 20;
    double rate = atof(argv[2]);
    int touch = argc > 3 && atoi(argv[3]) != 0;
    long long born = start_time();

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR1, &sa, NULL);

    unsigned char *mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        perror("mmap");
        return 2;
    }
    uint64_t seed = 0x9E3779B97F4A7C15ULL, *w = (uint64_t *)mem;
    for (size_t i = 0; i < bytes / 8; i++)
        w[i] = xorshift(&seed);
    say("ready %d\n", getpid());

    size_t npages = bytes / PAGE, cursor = 0;
    double per_ns = npages * rate / 100.0 / 1e9, owed = 0;
    uint64_t writes = 0;
    int64_t last = now_ns(), last_hb = last;
    struct timespec tick = {0, TICK_NS};
    for (;;) {
        nanosleep(&tick, NULL);
        int64_t now = now_ns(), gap = now - last;
        if (gap > GAP_NS)
            say("gap %lld %lld\n", (long long)last, (long long)now);
        if (armed && touch && gap > GAP_NS && start_time() != born) {
            armed = 0;
            volatile uint64_t sink = 0;
            int64_t t0 = now_ns();
            for (size_t p = 0; p < npages; p++)
                sink += w[p * (PAGE / 8)];
            int64_t t1 = now_ns();
            (void)sink;
            say("touched %zu %lld\n", bytes, (long long)(t1 - t0));
            now = now_ns();
        }
        owed += per_ns * (double)(gap < 10 * TICK_NS ? gap : 10 * TICK_NS);
        for (; owed >= 1 && npages; owed -= 1, writes++) {
            w[cursor * (PAGE / 8) + (xorshift(&seed) & (PAGE / 8 - 1))] = xorshift(&seed);
            cursor = (cursor + 1) % npages;
        }
        if (now - last_hb >= HB_NS) {
            say("hb %lld %llu\n", (long long)now, (unsigned long long)writes);
            last_hb = now;
        }
        last = now;
    }
}
