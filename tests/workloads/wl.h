/* Shared helpers of the test workloads: the status channel, async-signal-safe
 * line formatting, sleeping and the checksum the tests recompute in Python.
 *
 * Reports are single write(2) calls of one text line, so a line is never torn
 * and the status file's offset is part of the state a restore must bring back.
 * Status argument: a path (opened O_WRONLY|O_CREAT|O_TRUNC), "-" (stdout), or
 * "fd:N" (an already open descriptor, used across exec by execer).
 */
#ifndef WL_H
#define WL_H

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int wl_status_fd = 1;
static const char *wl_status_path;

static __attribute__((unused)) void wl_die(const char *what)
{
    char buf[256];
    size_t n = strlen(what);
    if (n > 200)
        n = 200;
    memcpy(buf, "error ", 6);
    memcpy(buf + 6, what, n);
    buf[6 + n] = '\n';
    (void)!write(2, buf, 7 + n);
    _exit(111);
}

/* Open the status channel. append=1 gives every process its own O_APPEND
 * description (multi-process workloads), so lines never overwrite each other. */
static __attribute__((unused)) void wl_status_open(const char *arg, int append)
{
    int fd;
    if (strcmp(arg, "-") == 0) {
        wl_status_fd = 1;
        return;
    }
    if (strncmp(arg, "fd:", 3) == 0) {
        wl_status_fd = atoi(arg + 3);
        return;
    }
    wl_status_path = arg;
    fd = open(arg, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        wl_die("open status");
    if (append) {
        close(fd);
        fd = open(arg, O_WRONLY | O_APPEND | O_CLOEXEC);
        if (fd < 0)
            wl_die("open status");
    }
    wl_status_fd = fd;
}

/* After fork: replace the inherited description by a private O_APPEND one at
 * the same fd number. */
static __attribute__((unused)) void wl_status_reopen_private(void)
{
    int fd;
    if (!wl_status_path)
        return;
    fd = open(wl_status_path, O_WRONLY | O_APPEND | O_CLOEXEC);
    if (fd < 0)
        wl_die("reopen status");
    if (dup3(fd, wl_status_fd, O_CLOEXEC) < 0)
        wl_die("dup3 status");
    close(fd);
}

/* A tiny line builder usable from signal handlers (no stdio). */
struct wl_line {
    char buf[4096];
    size_t len;
};

static __attribute__((unused)) void wl_s(struct wl_line *l, const char *s)
{
    size_t n = strlen(s);
    if (l->len + n > sizeof(l->buf) - 2)
        n = sizeof(l->buf) - 2 - l->len;
    memcpy(l->buf + l->len, s, n);
    l->len += n;
}

/* Numbers after a word get a space; after ':' or ',' they do not. */
static __attribute__((unused)) int wl_isalnum(char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

static __attribute__((unused)) void wl_u(struct wl_line *l, uint64_t v)
{
    char tmp[24];
    int i = 0;
    if (l->len > 0 && wl_isalnum(l->buf[l->len - 1]))
        wl_s(l, " ");
    do {
        tmp[i++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (i > 0 && l->len < sizeof(l->buf) - 2)
        l->buf[l->len++] = tmp[--i];
}

static __attribute__((unused)) void wl_x(struct wl_line *l, uint64_t v)
{
    char tmp[17];
    int i = 0;
    if (l->len > 0 && wl_isalnum(l->buf[l->len - 1]))
        wl_s(l, " ");
    do {
        tmp[i++] = "0123456789abcdef"[v & 15];
        v >>= 4;
    } while (v);
    while (i > 0 && l->len < sizeof(l->buf) - 2)
        l->buf[l->len++] = tmp[--i];
}

static __attribute__((unused)) void wl_hexbytes(struct wl_line *l, const unsigned char *p, size_t n)
{
    if (l->len > 0 && wl_isalnum(l->buf[l->len - 1]))
        wl_s(l, " ");
    for (size_t i = 0; i < n && l->len < sizeof(l->buf) - 3; i++) {
        l->buf[l->len++] = "0123456789abcdef"[p[i] >> 4];
        l->buf[l->len++] = "0123456789abcdef"[p[i] & 15];
    }
}

static __attribute__((unused)) void wl_emit(struct wl_line *l)
{
    int saved = errno;
    l->buf[l->len++] = '\n';
    (void)!write(wl_status_fd, l->buf, l->len);
    l->len = 0;
    errno = saved;
}

/* "word N" in one call. */
static __attribute__((unused)) void wl_report1(const char *word, uint64_t a)
{
    struct wl_line l = {.len = 0};
    wl_s(&l, word);
    wl_u(&l, a);
    wl_emit(&l);
}

/* "word A N" in one call. */
static __attribute__((unused)) void wl_report2(const char *word, uint64_t a, uint64_t b)
{
    struct wl_line l = {.len = 0};
    wl_s(&l, word);
    wl_u(&l, a);
    wl_u(&l, b);
    wl_emit(&l);
}

static __attribute__((unused)) void wl_ready(void)
{
    wl_report1("ready", (uint64_t)getpid());
}

static __attribute__((unused)) pid_t wl_gettid(void)
{
    return (pid_t)syscall(SYS_gettid);
}

/* Sleep ms milliseconds; a signal only shortens the sleep. */
static __attribute__((unused)) void wl_sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static __attribute__((unused)) uint64_t wl_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static __attribute__((unused)) void wl_on_signal(int sig, void (*handler)(int))
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    if (sigaction(sig, &sa, NULL) < 0)
        wl_die("sigaction");
}

/* Checksum of a byte stream, recomputable in Python as
 * (zlib.crc32(data) << 32) | zlib.adler32(data); both parts can be carried
 * across regions in address order, like zlib's running value. */
struct wl_sum {
    uint32_t crc;
    uint32_t a, b;
};

static uint32_t wl_crc_table[256];

static __attribute__((unused)) void wl_sum_init(struct wl_sum *s)
{
    if (!wl_crc_table[1]) {
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++)
                c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            wl_crc_table[i] = c;
        }
    }
    s->crc = 0xFFFFFFFFu;
    s->a = 1;
    s->b = 0;
}

static __attribute__((unused)) void wl_sum_update(struct wl_sum *s, const unsigned char *p, size_t n)
{
    uint32_t crc = s->crc, a = s->a, b = s->b;
    while (n > 0) {
        size_t chunk = n < 5552 ? n : 5552; /* adler32's overflow bound */
        for (size_t i = 0; i < chunk; i++) {
            crc = wl_crc_table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
            a += p[i];
            b += a;
        }
        a %= 65521;
        b %= 65521;
        p += chunk;
        n -= chunk;
    }
    s->crc = crc;
    s->a = a;
    s->b = b;
}

static __attribute__((unused)) uint64_t wl_sum_final(const struct wl_sum *s)
{
    return ((uint64_t)(s->crc ^ 0xFFFFFFFFu) << 32) | ((uint64_t)s->b << 16 | s->a);
}

/* xorshift64: the deterministic content generator of bigmem and mapper. */
static __attribute__((unused)) uint64_t wl_xorshift(uint64_t *state)
{
    uint64_t x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    return x;
}

#endif
