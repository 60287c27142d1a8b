/*
 * The lazy-pages fault server: one thread serves the userfaultfds of a
 * restored tree from a page source, until every saved page is in place.
 *
 * Each uffd has a table of spans: (task range, source file, file offset) and
 * one byte per page, set once the page is in place or must never be filled
 * (the program unmapped it or madvised it away). A fault is served first
 * (the faulting page, then a short read-ahead); when no message waits, the
 * next pending pages are pushed in batches of one checksum chunk. A page is
 * never copied twice: EEXIST counts as placed.
 *
 * The source is pages files read with pread into a small cache of whole
 * checksum chunks; a chunk is used only once its CRC-32C equals the one the
 * manifest recorded, so no unverified byte ever reaches a task.
 *
 * Events: FORK (the child's uffd joins with a copy of the parent's table: its
 * memory is a copy of the parent's, so what the parent had is there and the
 * rest is still missing; wipe-on-fork spans start empty and are never
 * filled), REMAP (spans move), REMOVE and UNMAP (pages marked never to fill).
 * A fault on a page outside every span or already done gets a zero page: an
 * unsaved page, or one the program dropped, reads as zeros.
 */
#include "core.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define CACHE_SLOTS 8
#define MSGS_PER_READ 64
#define MAX_RETRY 4096

struct span {
    uint64_t start, npages, offset;
    uint32_t file, flags;
    uint8_t *done;
};

struct space {
    int uffd;
    int dead;
    struct span *spans;
    size_t n;
    uint64_t left;          /* pages still to place */
    size_t cursor;          /* first span that may have pending pages */
};

struct slot {
    int64_t file, chunk;    /* -1: empty */
    unsigned char *buf;
};

struct retry {
    size_t space;
    uint64_t addr;
};

struct pycr_lazy {
    const struct pycr_lazy_file *files;
    size_t nfiles;
    uint64_t page, chunk, readahead;
    struct space *spaces;
    size_t nspaces;
    struct slot cache[CACHE_SLOTS];
    size_t next_slot;
    struct retry retries[MAX_RETRY];
    size_t nretries;
    int evfd;
    int request_fd, arrived_fd;     /* a remote source (pycr_lazy_set_remote), else -1 */
    int starved;                    /* the push found no chunk there yet: wait for one */
    pthread_mutex_t lock;           /* guards the fields below */
    struct space *incoming;
    size_t nincoming;
    int input_closed, stop;
    uint64_t push_from;             /* CLOCK_MONOTONIC ns before which nothing is pushed */
    struct pycr_lazy_stats st;
    uint64_t *times;
    size_t ntimes, times_cap;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void fail(struct pycr_lazy *s, int err, const char *what)
{
    if (!s->st.error) {
        s->st.error = err;
        snprintf(s->st.message, sizeof(s->st.message), "%s", what);
    }
}

/* ---- the page source ---------------------------------------------------- */

/*
 * A remote source: a chunk lands in the file (a memfd) when another thread
 * has received and checked it; `ready[idx]` then turns CHUNK_THERE. A fault
 * that needs a chunk not yet there asks for it once (its (file, chunk) on
 * request_fd, which that thread turns into a priority request to the
 * source) and waits for it; arrived_fd is poked whenever a chunk lands.
 */
enum { CHUNK_MISSING, CHUNK_ASKED, CHUNK_THERE };

static int chunk_there(const struct pycr_lazy_file *file, uint64_t idx)
{
    return !file->ready || idx >= file->nsums ||
           __atomic_load_n(&file->ready[idx], __ATOMIC_ACQUIRE) == CHUNK_THERE;
}

static int wait_chunk(struct pycr_lazy *s, uint32_t f, uint64_t idx)
{
    const struct pycr_lazy_file *file = &s->files[f];
    if (chunk_there(file, idx))
        return 0;
    uint8_t missing = CHUNK_MISSING;
    if (__atomic_compare_exchange_n(&file->ready[idx], &missing, CHUNK_ASKED, 0, __ATOMIC_ACQ_REL,
                                    __ATOMIC_ACQUIRE)) {
        uint32_t want[2] = {f, (uint32_t)idx};
        if (write(s->request_fd, want, sizeof(want)) != sizeof(want)) {
            fail(s, errno ? errno : EIO, "asking the page source for a chunk");
            return -1;
        }
    }
    while (!chunk_there(file, idx)) {
        struct pollfd p[2] = {{s->arrived_fd, POLLIN, 0}, {s->evfd, POLLIN, 0}};
        if (poll(p, 2, 1000) < 0 && errno != EINTR) {
            fail(s, errno, "poll");
            return -1;
        }
        uint64_t v;
        if (p[0].revents & POLLIN) {
            if (read(s->arrived_fd, &v, sizeof(v)) < 0 && errno != EAGAIN) {
                fail(s, errno, "eventfd");
                return -1;
            }
            /* The serve loop will not see this poke again: a starved push must retry. */
            s->starved = 0;
        }
        pthread_mutex_lock(&s->lock);
        int stop = s->stop;
        pthread_mutex_unlock(&s->lock);
        if (stop) {
            fail(s, ECANCELED, "stopped while a fault waited for its page from the source");
            return -1;
        }
    }
    return 0;
}

/* The cached, verified chunk `idx` of file `f`, or NULL (st.error set). */
static unsigned char *chunk_of(struct pycr_lazy *s, uint32_t f, uint64_t idx)
{
    for (size_t i = 0; i < CACHE_SLOTS; i++)
        if (s->cache[i].file == f && s->cache[i].chunk == (int64_t)idx)
            return s->cache[i].buf;
    const struct pycr_lazy_file *file = &s->files[f];
    if (file->ready && wait_chunk(s, f, idx) < 0)
        return NULL;
    uint64_t pos = idx * s->chunk, len = file->size - pos;
    if (len > s->chunk)
        len = s->chunk;
    if (pos >= file->size || idx >= file->nsums) {
        fail(s, EINVAL, "a span reads past the end of its pages file");
        return NULL;
    }
    struct slot *slot = &s->cache[s->next_slot++ % CACHE_SLOTS];
    slot->file = -1;
    for (uint64_t done = 0; done < len;) {
        ssize_t r = pread(file->fd, slot->buf + done, len - done, (off_t)(pos + done));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            fail(s, r < 0 ? errno : ENODATA, "reading a pages file");
            return NULL;
        }
        done += (uint64_t)r;
    }
    if (pycr_crc32c(0, slot->buf, len) != file->sums[idx]) {
        fail(s, EBADMSG, "checksum mismatch in a pages file: its pages are corrupt");
        return NULL;
    }
    slot->file = f;
    slot->chunk = (int64_t)idx;
    return slot->buf;
}

/* ---- spans -------------------------------------------------------------- */

static struct span *find_span(struct space *sp, uint64_t addr, uint64_t page)
{
    size_t lo = 0, hi = sp->n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        struct span *x = &sp->spans[mid];
        if (addr < x->start)
            hi = mid;
        else if (addr >= x->start + x->npages * page)
            lo = mid + 1;
        else
            return x;
    }
    return NULL;
}

static void mark(struct pycr_lazy *s, struct space *sp, struct span *x, uint64_t i, uint64_t n)
{
    for (uint64_t k = i; k < i + n && k < x->npages; k++)
        if (!x->done[k]) {
            x->done[k] = 1;
            sp->left--;
        }
}

/* Mark every page of [start, end) as never to fill. */
static void drop_range(struct pycr_lazy *s, struct space *sp, uint64_t start, uint64_t end)
{
    for (size_t j = 0; j < sp->n; j++) {
        struct span *x = &sp->spans[j];
        uint64_t xs = x->start, xe = x->start + x->npages * s->page;
        uint64_t lo = start > xs ? start : xs, hi = end < xe ? end : xe;
        if (lo >= hi)
            continue;
        for (uint64_t a = lo; a < hi; a += s->page) {
            uint64_t k = (a - xs) / s->page;
            if (!x->done[k]) {
                x->done[k] = 1;
                sp->left--;
                s->st.dropped++;
            }
        }
    }
}

static void kill_space(struct space *sp)
{
    for (size_t j = 0; j < sp->n; j++)
        memset(sp->spans[j].done, 1, sp->spans[j].npages);
    sp->left = 0;
    sp->dead = 1;
}

/* Split span j at address `at` (inside it); the table grows by one. */
static int split_span(struct pycr_lazy *s, struct space *sp, size_t j, uint64_t at)
{
    struct span *grown = realloc(sp->spans, (sp->n + 1) * sizeof(*grown));
    if (!grown)
        return -ENOMEM;
    sp->spans = grown;
    struct span *x = &sp->spans[j];
    uint64_t head = (at - x->start) / s->page;
    struct span tail = *x;
    tail.start = at;
    tail.npages = x->npages - head;
    tail.offset = x->offset + head * s->page;
    tail.done = malloc(tail.npages);
    uint8_t *keep = malloc(head);
    if (!tail.done || !keep) {
        free(tail.done);
        free(keep);
        return -ENOMEM;
    }
    memcpy(tail.done, x->done + head, tail.npages);
    memcpy(keep, x->done, head);
    free(x->done);
    x->done = keep;
    x->npages = head;
    memmove(&sp->spans[j + 2], &sp->spans[j + 1], (sp->n - j - 1) * sizeof(*x));
    sp->spans[j + 1] = tail;
    sp->n++;
    return 0;
}

static int by_start(const void *a, const void *b)
{
    const struct span *x = a, *y = b;
    return x->start < y->start ? -1 : x->start > y->start;
}

/* mremap moved [from, from+len) to `to`: the spans (and what is done) move with it. */
static int remap(struct pycr_lazy *s, struct space *sp, uint64_t from, uint64_t to, uint64_t len)
{
    drop_range(s, sp, to, to + len);
    for (size_t j = 0; j < sp->n; j++) {
        struct span *x = &sp->spans[j];
        uint64_t end = x->start + x->npages * s->page;
        int r = 0;
        if (x->start < from && from < end)
            r = split_span(s, sp, j, from);
        else if (x->start < from + len && from + len < end)
            r = split_span(s, sp, j, from + len);
        if (r < 0)
            return r;
    }
    for (size_t j = 0; j < sp->n; j++) {
        struct span *x = &sp->spans[j];
        if (x->start >= from && x->start < from + len)
            x->start = x->start - from + to;
    }
    qsort(sp->spans, sp->n, sizeof(*sp->spans), by_start);
    sp->cursor = 0;
    return 0;
}

/* The child of a fork: the same spans, what is done copied; wipe-on-fork spans empty. */
static int fork_space(struct pycr_lazy *s, struct space *parent, int uffd, struct space *child)
{
    memset(child, 0, sizeof(*child));
    child->uffd = uffd;
    child->spans = calloc(parent->n ? parent->n : 1, sizeof(struct span));
    if (!child->spans)
        return -ENOMEM;
    for (size_t j = 0; j < parent->n; j++) {
        struct span *x = &parent->spans[j], *y = &child->spans[j];
        *y = *x;
        y->done = malloc(x->npages);
        if (!y->done)
            return -ENOMEM;
        child->n++;
        if (x->flags & PYCR_LAZY_WIPEONFORK)
            memset(y->done, 1, x->npages);
        else
            memcpy(y->done, x->done, x->npages);
        for (uint64_t k = 0; k < y->npages; k++)
            child->left += !y->done[k];
    }
    return 0;
}

/* ---- placing pages ------------------------------------------------------ */

static int wake(struct space *sp, uint64_t addr, uint64_t page)
{
    struct uffdio_range range = {addr, page};
    return ioctl(sp->uffd, UFFDIO_WAKE, &range) < 0 ? -errno : 0;
}

/*
 * Copy pages [i, i+n) of span x (all in one chunk) into the task. Returns
 * pages placed by this call, -EAGAIN when an event must be read first, or
 * another -errno (st.error set).
 */
static long copy_pages(struct pycr_lazy *s, struct space *sp, struct span *x, uint64_t i, uint64_t n)
{
    uint64_t off = x->offset + i * s->page, idx = off / s->chunk;
    unsigned char *buf = chunk_of(s, x->file, idx);
    long placed = 0;
    if (!buf)
        return -EIO;
    while (n) {
        struct uffdio_copy c = {
            .dst = x->start + i * s->page,
            .src = (uint64_t)(uintptr_t)(buf + (off - idx * s->chunk)),
            .len = n * s->page,
            .mode = 0,
        };
        int r = ioctl(sp->uffd, UFFDIO_COPY, &c);
        int err = r < 0 ? errno : 0;
        if (c.copy > 0) {
            uint64_t got = (uint64_t)c.copy / s->page;
            mark(s, sp, x, i, got);
            placed += (long)got;
            i += got, n -= got, off += got * s->page;
            continue;
        }
        if (!err)
            break;
        if (err == EEXIST) {                /* the page is there: placed */
            mark(s, sp, x, i, 1);
            wake(sp, x->start + i * s->page, s->page);
            i++, n--, off += s->page;
            continue;
        }
        if (err == ENOENT && n > 1) {       /* the range crosses a VMA boundary: page by page */
            for (uint64_t k = 0; k < n; k++) {
                long one = copy_pages(s, sp, x, i + k, 1);
                if (one < 0)
                    return placed ? placed : one;
                placed += one;
            }
            return placed;
        }
        if (err == ENOENT) {                /* no VMA of ours there any more: nothing to fill */
            mark(s, sp, x, i, 1);
            i++, n--, off += s->page;
            continue;
        }
        if (err == ESRCH) {                 /* the process is gone */
            kill_space(sp);
            return placed;
        }
        if (err == EAGAIN)
            return placed ? placed : -EAGAIN;
        fail(s, err, "UFFDIO_COPY");
        return -err;
    }
    return placed;
}

/* A zero page at addr (a page never saved, or one the program dropped). */
static int zero_page(struct pycr_lazy *s, struct space *sp, uint64_t addr)
{
    struct uffdio_zeropage z = {.range = {addr, s->page}, .mode = 0};
    if (ioctl(sp->uffd, UFFDIO_ZEROPAGE, &z) == 0) {
        s->st.zero_pages++;
        return 0;
    }
    switch (errno) {
    case EEXIST:
        return wake(sp, addr, s->page);
    case EAGAIN:
        return -EAGAIN;
    case ENOENT:
    case ESRCH:
        return 0;
    default:
        fail(s, errno, "UFFDIO_ZEROPAGE");
        return -errno;
    }
}

/* Pending pages from i on in span x, within one chunk, at most `most`. */
static uint64_t pending_run(struct pycr_lazy *s, struct span *x, uint64_t i, uint64_t most)
{
    uint64_t idx = (x->offset + i * s->page) / s->chunk, n = 0;
    while (i + n < x->npages && n < most && !x->done[i + n] &&
           (x->offset + (i + n) * s->page) / s->chunk == idx)
        n++;
    return n;
}

static int serve_fault(struct pycr_lazy *s, size_t spi, uint64_t addr, uint64_t began)
{
    struct space *sp = &s->spaces[spi];
    uint64_t page = addr & ~(s->page - 1);
    struct span *x = sp->dead ? NULL : find_span(sp, page, s->page);
    uint64_t i = x ? (page - x->start) / s->page : 0;
    long r;
    if (!x || x->done[i]) {
        r = zero_page(s, sp, page);
    } else {
        r = copy_pages(s, sp, x, i, 1);
        if (r > 0) {
            s->st.fault_pages++;
            uint64_t more = pending_run(s, x, i + 1, s->readahead);
            long ra = more ? copy_pages(s, sp, x, i + 1, more) : 0;
            if (ra > 0)
                s->st.fault_pages += (uint64_t)ra;
        }
    }
    if (r == -EAGAIN) {
        if (s->nretries == MAX_RETRY) {
            fail(s, EAGAIN, "too many faults waiting for an event");
            return -EAGAIN;
        }
        s->retries[s->nretries++] = (struct retry){spi, addr};
        return 0;
    }
    if (r < 0)
        return (int)r;
    s->st.faults++;
    if (s->ntimes == s->times_cap) {
        size_t cap = s->times_cap ? 2 * s->times_cap : 4096;
        uint64_t *t = realloc(s->times, cap * sizeof(*t));
        if (t) {
            s->times = t;
            s->times_cap = cap;
        }
    }
    if (s->ntimes < s->times_cap)
        s->times[s->ntimes++] = now_ns() - began;
    return 0;
}

static uint64_t pages_left(struct pycr_lazy *s)
{
    uint64_t n = 0;
    for (size_t k = 0; k < s->nspaces; k++)
        n += s->spaces[k].left;
    return n;
}

/* One batch of pending pages of the first space that has any whose chunk is there:
 * 1 after a batch, 0 when none can be pushed now (s->starved: none is there yet). */
static long push_some(struct pycr_lazy *s)
{
    s->starved = 0;
    for (size_t k = 0; k < s->nspaces; k++) {
        struct space *sp = &s->spaces[k];
        int behind = 0;         /* a span before this one still waits for a chunk */
        for (size_t j = sp->cursor; sp->left && j < sp->n; j++) {
            struct span *x = &sp->spans[j];
            int pending = 0;
            for (uint64_t i = 0; i < x->npages; i++) {
                if (x->done[i])
                    continue;
                uint64_t idx = (x->offset + i * s->page) / s->chunk;
                if (!chunk_there(&s->files[x->file], idx)) {
                    pending = 1;        /* skip to the first page of the next chunk */
                    uint64_t next = ((idx + 1) * s->chunk - x->offset) / s->page;
                    i = next - 1;
                    continue;
                }
                uint64_t n = pending_run(s, x, i, s->chunk / s->page);
                long r = copy_pages(s, sp, x, i, n);
                if (r > 0)
                    s->st.pushed_pages += (uint64_t)r;
                return r == -EAGAIN ? 1 : r < 0 ? r : 1;
            }
            if (!pending && !behind)
                sp->cursor = j + 1;
            behind |= pending;
        }
    }
    s->starved = pages_left(s) > 0;
    return 0;
}

static int add_space(struct pycr_lazy *s, struct space *sp)
{
    struct space *grown = realloc(s->spaces, (s->nspaces + 1) * sizeof(*grown));
    if (!grown)
        return -ENOMEM;
    s->spaces = grown;
    s->spaces[s->nspaces++] = *sp;
    s->st.uffds++;
    return 0;
}

/* Read and handle every message waiting on one uffd. */
static int drain(struct pycr_lazy *s, size_t spi)
{
    struct uffd_msg msgs[MSGS_PER_READ];
    for (;;) {
        ssize_t got = read(s->spaces[spi].uffd, msgs, sizeof(msgs));
        uint64_t began = now_ns();
        if (got < 0)
            return errno == EAGAIN || errno == EINTR ? 0 : (fail(s, errno, "reading a userfaultfd"), -errno);
        for (size_t m = 0; m < (size_t)got / sizeof(msgs[0]); m++) {
            struct uffd_msg *msg = &msgs[m];
            struct space *sp = &s->spaces[spi];
            int r = 0;
            switch (msg->event) {
            case UFFD_EVENT_PAGEFAULT:
                r = serve_fault(s, spi, msg->arg.pagefault.address, began);
                break;
            case UFFD_EVENT_FORK: {
                struct space child;
                r = fork_space(s, sp, (int)msg->arg.fork.ufd, &child);
                if (!r)
                    r = add_space(s, &child);
                s->st.forks++;
                break;
            }
            case UFFD_EVENT_REMAP:
                r = remap(s, sp, msg->arg.remap.from, msg->arg.remap.to, msg->arg.remap.len);
                break;
            case UFFD_EVENT_REMOVE:
            case UFFD_EVENT_UNMAP:
                drop_range(s, sp, msg->arg.remove.start, msg->arg.remove.end);
                break;
            }
            if (r < 0) {
                fail(s, -r, "handling a userfaultfd message");
                return r;
            }
        }
        if ((size_t)got < sizeof(msgs))
            return 0;
    }
}

static void take_incoming(struct pycr_lazy *s)
{
    pthread_mutex_lock(&s->lock);
    for (size_t i = 0; i < s->nincoming; i++)
        if (add_space(s, &s->incoming[i]) < 0)
            fail(s, ENOMEM, "adding a userfaultfd");
    s->nincoming = 0;
    pthread_mutex_unlock(&s->lock);
}

long pycr_lazy_serve(struct pycr_lazy *s)
{
    struct pollfd *fds = NULL;
    for (;;) {
        take_incoming(s);
        pthread_mutex_lock(&s->lock);
        int stop = s->stop, closed = s->input_closed;
        uint64_t push_from = s->push_from;
        pthread_mutex_unlock(&s->lock);
        uint64_t left = pages_left(s), now = now_ns();
        int pushing = left && now >= push_from && !s->starved;
        if (stop || s->st.error)
            break;
        if (closed && !left && !s->nretries)
            break;
        size_t extra = s->arrived_fd >= 0 ? 2 : 1;
        struct pollfd *grown = realloc(fds, (s->nspaces + extra) * sizeof(*fds));
        if (!grown) {
            fail(s, ENOMEM, "poll set");
            break;
        }
        fds = grown;
        fds[0] = (struct pollfd){s->evfd, POLLIN, 0};
        for (size_t k = 0; k < s->nspaces; k++)
            fds[k + 1] = (struct pollfd){s->spaces[k].uffd, POLLIN, 0};
        if (extra == 2)
            fds[s->nspaces + 1] = (struct pollfd){s->arrived_fd, POLLIN, 0};
        int timeout = s->nretries ? 1 : pushing ? 0 : left && now < push_from ?
                      (int)((push_from - now) / 1000000 + 1) : -1;
        int n = poll(fds, s->nspaces + extra, timeout);
        if (n > 0 && extra == 2 && (fds[s->nspaces + 1].revents & POLLIN)) {
            uint64_t v;
            if (read(s->arrived_fd, &v, sizeof(v)) < 0 && errno != EAGAIN)
                fail(s, errno, "eventfd");
            s->starved = 0;             /* a chunk landed: try the push again */
            n--;
        }
        if (n < 0 && errno != EINTR) {
            fail(s, errno, "poll");
            break;
        }
        if (n > 0 && (fds[0].revents & POLLIN)) {
            uint64_t v;
            if (read(s->evfd, &v, sizeof(v)) < 0 && errno != EAGAIN)
                fail(s, errno, "eventfd");
        }
        size_t nspaces = s->nspaces;        /* a fork may add one meanwhile */
        for (size_t k = 0; n > 0 && k < nspaces; k++)
            if (fds[k + 1].revents & (POLLIN | POLLERR))
                drain(s, k);
        size_t waiting = s->nretries;
        s->nretries = 0;
        for (size_t r = 0; r < waiting && !s->st.error; r++)
            serve_fault(s, s->retries[r].space, s->retries[r].addr, now_ns());
        if (n == 0 && left && now >= push_from && !s->starved && !s->nretries && push_some(s) < 0)
            break;
    }
    free(fds);
    return s->st.error ? -s->st.error : 0;
}

/* ---- the Python side ---------------------------------------------------- */

struct pycr_lazy *pycr_lazy_new(const struct pycr_lazy_file *files, size_t nfiles,
                                uint64_t chunk, uint64_t readahead)
{
    struct pycr_lazy *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    s->files = files;
    s->nfiles = nfiles;
    s->page = (uint64_t)sysconf(_SC_PAGESIZE);
    s->chunk = chunk;
    s->readahead = readahead;
    s->evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    s->request_fd = s->arrived_fd = -1;
    pthread_mutex_init(&s->lock, NULL);
    int ok = s->evfd >= 0 && chunk && chunk % s->page == 0;
    for (size_t i = 0; i < CACHE_SLOTS; i++) {
        s->cache[i].file = s->cache[i].chunk = -1;
        s->cache[i].buf = ok ? malloc(chunk) : NULL;
        ok = ok && s->cache[i].buf;
    }
    if (!ok) {
        pycr_lazy_free(s);
        return NULL;
    }
    return s;
}

static void poke(struct pycr_lazy *s)
{
    uint64_t one = 1;
    if (write(s->evfd, &one, sizeof(one)) < 0) {
        /* the counter is saturated: the server is awake anyway */
    }
}

long pycr_lazy_add(struct pycr_lazy *s, int uffd, const struct pycr_lazy_run *runs, size_t nruns)
{
    struct space sp = {.uffd = uffd};
    sp.spans = calloc(nruns ? nruns : 1, sizeof(struct span));
    if (!sp.spans)
        return -ENOMEM;
    for (size_t i = 0; i < nruns; i++) {
        const struct pycr_lazy_run *r = &runs[i];
        if (r->file >= s->nfiles || !r->len || r->len % s->page || r->start % s->page || r->offset % s->page ||
            r->offset + r->len > s->files[r->file].size || (i && r->start < runs[i - 1].start + runs[i - 1].len)) {
            for (size_t j = 0; j < sp.n; j++)
                free(sp.spans[j].done);
            free(sp.spans);
            return -EINVAL;
        }
        struct span *x = &sp.spans[sp.n];
        *x = (struct span){r->start, r->len / s->page, r->offset, r->file, r->flags, calloc(r->len / s->page, 1)};
        if (!x->done)
            break;
        sp.n++;
        sp.left += x->npages;
    }
    if (sp.n < nruns) {
        for (size_t j = 0; j < sp.n; j++)
            free(sp.spans[j].done);
        free(sp.spans);
        return -ENOMEM;
    }
    pthread_mutex_lock(&s->lock);
    struct space *grown = realloc(s->incoming, (s->nincoming + 1) * sizeof(*grown));
    if (grown) {
        s->incoming = grown;
        s->incoming[s->nincoming++] = sp;
    }
    pthread_mutex_unlock(&s->lock);
    if (!grown)
        return -ENOMEM;
    poke(s);
    return 0;
}

void pycr_lazy_set_remote(struct pycr_lazy *s, int request_fd, int arrived_fd)
{
    s->request_fd = request_fd;
    s->arrived_fd = arrived_fd;
}

void pycr_lazy_finish_input(struct pycr_lazy *s)
{
    pthread_mutex_lock(&s->lock);
    s->input_closed = 1;
    pthread_mutex_unlock(&s->lock);
    poke(s);
}

void pycr_lazy_push_from(struct pycr_lazy *s, uint64_t when_ns)
{
    pthread_mutex_lock(&s->lock);
    s->push_from = when_ns;
    pthread_mutex_unlock(&s->lock);
    poke(s);
}

void pycr_lazy_stop(struct pycr_lazy *s)
{
    pthread_mutex_lock(&s->lock);
    s->stop = 1;
    pthread_mutex_unlock(&s->lock);
    poke(s);
}

void pycr_lazy_stats(struct pycr_lazy *s, struct pycr_lazy_stats *out, uint64_t *left)
{
    *out = s->st;
    *left = pages_left(s);
}

size_t pycr_lazy_fault_times(struct pycr_lazy *s, uint64_t *out, size_t cap)
{
    size_t n = s->ntimes < cap ? s->ntimes : cap;
    memcpy(out, s->times, n * sizeof(*out));
    return s->ntimes;
}

void pycr_lazy_free(struct pycr_lazy *s)
{
    for (size_t k = 0; k < s->nspaces; k++) {
        for (size_t j = 0; j < s->spaces[k].n; j++)
            free(s->spaces[k].spans[j].done);
        free(s->spaces[k].spans);
        close(s->spaces[k].uffd);
    }
    for (size_t k = 0; k < s->nincoming; k++) {
        for (size_t j = 0; j < s->incoming[k].n; j++)
            free(s->incoming[k].spans[j].done);
        free(s->incoming[k].spans);
        close(s->incoming[k].uffd);
    }
    for (size_t i = 0; i < CACHE_SLOTS; i++)
        free(s->cache[i].buf);
    if (s->evfd >= 0)
        close(s->evfd);
    pthread_mutex_destroy(&s->lock);
    free(s->spaces);
    free(s->incoming);
    free(s->times);
    free(s);
}
