/*
 * Benchmark workload: a process (or a tree of processes) holding anonymous memory filled
 * with pseudo-random, incompressible bytes, optionally rewriting a share of its pages
 * every second so incremental dumps have something to find.
 *
 *   memhog MIB [RATE_PCT [NPROC]]
 *
 * MIB      total MiB of anonymous memory, split evenly across the NPROC processes.
 * RATE_PCT percent of each process's pages rewritten per second (0: memory stays still).
 * NPROC    number of processes (default 1). Process i's children are 4i+1..4i+4, so 16
 *          processes form a tree of depth 3 (1 -> 4 -> 11).
 *
 * Each process prints "ready PID" on stdout once its memory is filled. On SIGUSR1 it
 * prints "sum PID TICKS CHECKSUM" (FNV-1a over its whole region): a restore can be
 * checked by comparing the checksum with the one taken before the dump (RATE_PCT 0) and
 * by TICKS still growing. Open stdout with O_APPEND so lines of the tree do not mix.
 * Children die with their parent (PR_SET_PDEATHSIG), so killing the tree by PID is safe.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define TICK_NS 10000000L /* 10 ms */

static volatile sig_atomic_t want_sum;

static void on_usr1(int sig) { (void)sig; want_sum = 1; }

static uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static uint64_t fnv1a(const unsigned char *p, size_t n)
{
    uint64_t h = 1469598103934665603ULL;
    const uint64_t *w = (const uint64_t *)p;
    for (size_t i = 0; i < n / 8; i++) {
        h ^= w[i];
        h *= 1099511628211ULL;
    }
    return h;
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

static void run(int index, size_t bytes, double rate_pct)
{
    unsigned char *mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        perror("mmap");
        _exit(2);
    }
    uint64_t seed = 0x9E3779B97F4A7C15ULL * (uint64_t)(index + 1);
    uint64_t *w = (uint64_t *)mem;
    for (size_t i = 0; i < bytes / 8; i++)
        w[i] = xorshift(&seed);
    say("ready %d\n", getpid());

    size_t npages = bytes / PAGE, cursor = 0;
    double per_tick = npages * rate_pct / 100.0 * (TICK_NS / 1e9), owed = 0;
    uint64_t ticks = 0;
    struct timespec tick = {0, TICK_NS};
    for (;;) {
        nanosleep(&tick, NULL);
        ticks++;
        owed += per_tick;
        for (; owed >= 1 && npages; owed -= 1) {
            w[cursor * (PAGE / 8) + (xorshift(&seed) & (PAGE / 8 - 1))] = xorshift(&seed);
            cursor = (cursor + 1) % npages;
        }
        if (want_sum) {
            want_sum = 0;
            say("sum %d %llu %016llx\n", getpid(), (unsigned long long)ticks,
                (unsigned long long)fnv1a(mem, bytes));
        }
    }
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s MIB [RATE_PCT [NPROC]]\n", argv[0]);
        return 1;
    }
    size_t mib = strtoul(argv[1], NULL, 10);
    double rate = argc > 2 ? atof(argv[2]) : 0;
    int nproc = argc > 3 ? atoi(argv[3]) : 1;
    if (nproc < 1)
        nproc = 1;
    size_t share = (mib << 20) / (size_t)nproc / PAGE * PAGE;
    if (share < PAGE)
        share = PAGE;

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);

    int index = 0;
    for (int child = 1; child <= 4; child++) {
        int c = 4 * index + child;
        if (c >= nproc)
            break;
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 2;
        }
        if (pid == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            index = c;
            child = 0; /* restart the loop: now fork this process's own children */
        }
    }
    run(index, share, rate);
    return 0;
}
