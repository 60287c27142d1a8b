/*
 * pycr native core: bulk memory I/O between tasks, pagemap walks, page
 * hashing and raw syscalls. See core.h for the return convention.
 * No function keeps a buffer between calls: the caller owns every buffer
 * (pycr.native.core.Copier for the dump's copies), so that two dumps or
 * restores in one process never share one.
 */
#include "core.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <linux/sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/prctl.h>
#include <sys/uio.h>
#include <unistd.h>

extern char **environ;

/* Remote iovecs per process_vm_* call: the kernel's UIO_MAXIOV. */
#define BATCH_IOVS 1024

/* The page size, asked of the kernel once (it is not 4096 everywhere). */
static uint64_t page_size(void)
{
    static uint64_t size;
    if (!size)
        size = (uint64_t)sysconf(_SC_PAGESIZE);
    return size;
}
#define PAGE_SZ page_size()


static long write_all(int fd, const unsigned char *p, size_t n)
{
    size_t done = 0;
    while (done < n) {
        ssize_t w = write(fd, p + done, n - done);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (w == 0)
            return -EIO;
        done += (size_t)w;
    }
    return 0;
}

/*
 * A cursor over the (start, len) runs: hands out remote iovecs of at most
 * `budget` bytes in total, splitting a run where a batch ends.
 */
struct run_cursor {
    const uint64_t *runs;
    size_t nruns, idx;
    uint64_t off; /* bytes already consumed of runs[idx] */
};

static size_t next_batch(struct run_cursor *c, struct iovec *iov, size_t budget,
                         size_t *nbytes)
{
    size_t n = 0, total = 0;
    while (c->idx < c->nruns && n < BATCH_IOVS && total < budget) {
        uint64_t start = c->runs[2 * c->idx], len = c->runs[2 * c->idx + 1];
        uint64_t left = len - c->off, take = left;
        if (take > budget - total)
            take = budget - total;
        if (take) {
            iov[n].iov_base = (void *)(uintptr_t)(start + c->off);
            iov[n].iov_len = take;
            n++;
            total += take;
        }
        c->off += take;
        if (c->off == len) {
            c->idx++;
            c->off = 0;
        }
    }
    *nbytes = total;
    return n;
}

/* Drop the first `done` bytes of an iovec array (after a short transfer). */
static size_t iov_advance(struct iovec *iov, size_t n, size_t done)
{
    size_t i = 0;
    while (i < n && done >= iov[i].iov_len) {
        done -= iov[i].iov_len;
        i++;
    }
    if (i < n && done) {
        iov[i].iov_base = (char *)iov[i].iov_base + done;
        iov[i].iov_len -= done;
    }
    memmove(iov, iov + i, (n - i) * sizeof(*iov));
    return n - i;
}

/* Move one batch between local [buf, nbytes) and the remote iovecs,
 * resuming after short transfers. `fail_addr` gets the remote address where
 * the kernel stopped if it cannot go on. */
static long transfer_batch(int pid, int write_remote, unsigned char *buf,
                           struct iovec *remote, size_t nremote, size_t nbytes,
                           uint64_t *fail_addr)
{
    size_t done = 0;
    while (done < nbytes) {
        struct iovec local = {buf + done, nbytes - done};
        ssize_t r = write_remote
            ? process_vm_writev(pid, &local, 1, remote, nremote, 0)
            : process_vm_readv(pid, &local, 1, remote, nremote, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            if (fail_addr)
                *fail_addr = (uint64_t)(uintptr_t)remote[0].iov_base;
            return r < 0 ? -errno : -EFAULT;
        }
        done += (size_t)r;
        nremote = iov_advance(remote, nremote, (size_t)r);
    }
    return 0;
}

struct sum_job {
    struct pycr_sums *sums;
    const unsigned char *buf;
    size_t len;
    long ret;
};

static void *sum_thread(void *arg)
{
    struct sum_job *job = arg;
    job->ret = pycr_sums_update(job->sums, job->buf, job->len);
    return NULL;
}

/*
 * write() the buffer and checksum it at the same time: with O_DIRECT the
 * writing thread mostly waits for the device, so a second thread sums the
 * same (read-only) buffer meanwhile and the CRC costs next to no time.
 * Falls back to summing in line if no thread can be made.
 */
static long write_summed(int fd, const unsigned char *buf, size_t n, struct pycr_sums *sums)
{
    struct sum_job job = {sums, buf, n, 0};
    pthread_t th;
    long r;
    if (!sums)
        return write_all(fd, buf, n);
    if (pthread_create(&th, NULL, sum_thread, &job) != 0) {
        r = pycr_sums_update(sums, buf, n);
        return r < 0 ? r : write_all(fd, buf, n);
    }
    r = write_all(fd, buf, n);
    pthread_join(th, NULL);
    return r < 0 ? r : job.ret;
}

struct write_job {
    int fd;
    const unsigned char *buf;
    size_t n;
    struct pycr_sums *sums;
    long ret;
};

static void *write_thread(void *arg)
{
    struct write_job *job = arg;
    job->ret = write_summed(job->fd, job->buf, job->n, job->sums);
    return NULL;
}

/*
 * The buffer is used in two halves: while one half is written (and summed)
 * by a second thread, process_vm_readv fills the other, so the reads (about
 * four times faster than an O_DIRECT write here) hide behind the writes.
 * Bytes reach fd in run order; on a failure the batches before it are
 * written, as when the copy was one batch at a time.
 */
static int copy_overlap = 1;

void pycr_set_copy_overlap(int on)
{
    copy_overlap = on;
}

long pycr_vm_read_runs(int pid, const uint64_t *runs, size_t nruns, int fd,
                       unsigned char *buf, size_t buflen,
                       uint64_t *fail_addr, struct pycr_sums *sums)
{
    struct iovec remote[BATCH_IOVS];
    struct run_cursor c = {runs, nruns, 0, 0};
    size_t half = (buflen / 2) & ~(PAGE_SZ - 1);
    unsigned char *cur = buf, *next = buf + half;
    long total = 0;
    if (buflen < PAGE_SZ)
        return -EINVAL;
    if (half < PAGE_SZ || !copy_overlap) {  /* one page: no room for two halves */
        half = buflen & ~(PAGE_SZ - 1);
        next = NULL;
    }
    size_t nbytes, n = next_batch(&c, remote, half, &nbytes);
    if (!n)
        return 0;
    long r = transfer_batch(pid, 0, cur, remote, n, nbytes, fail_addr);
    if (r < 0)
        return r;
    for (;;) {
        struct write_job job = {fd, cur, nbytes, sums, 0};
        pthread_t th;
        int threaded = next != NULL && pthread_create(&th, NULL, write_thread, &job) == 0;
        if (!threaded)
            write_thread(&job);
        size_t nbytes2 = 0, n2 = 0;
        long r2 = 0;
        if (job.ret >= 0 || threaded) {
            unsigned char *into = next ? next : cur;
            if (!threaded || into != cur) {
                n2 = next_batch(&c, remote, half, &nbytes2);
                if (n2)
                    r2 = transfer_batch(pid, 0, into, remote, n2, nbytes2, fail_addr);
            }
        }
        if (threaded)
            pthread_join(th, NULL);
        if (job.ret < 0)
            return job.ret;
        total += (long)nbytes;
        if (r2 < 0)
            return r2;
        if (!n2)
            return total;
        if (next) {
            unsigned char *t = cur;
            cur = next;
            next = t;
        }
        nbytes = nbytes2;
    }
}

long pycr_vm_write_runs(int pid, const uint64_t *runs, size_t nruns,
                        const unsigned char *src, uint64_t *fail_addr)
{
    struct iovec remote[BATCH_IOVS];
    struct run_cursor c = {runs, nruns, 0, 0};
    long total = 0;
    for (;;) {
        size_t nbytes, n = next_batch(&c, remote, SIZE_MAX / 2, &nbytes);
        if (!n)
            return total;
        long r = transfer_batch(pid, 1, (unsigned char *)src + total, remote, n,
                                nbytes, fail_addr);
        if (r < 0)
            return r;
        total += (long)nbytes;
    }
}

long pycr_vm_read(int pid, uint64_t addr, unsigned char *dst, size_t len)
{
    struct iovec remote = {(void *)(uintptr_t)addr, len};
    if (!len)
        return 0;
    long r = transfer_batch(pid, 0, dst, &remote, 1, len, NULL);
    return r < 0 ? r : (long)len;
}

long pycr_vm_write(int pid, uint64_t addr, const unsigned char *src, size_t len)
{
    struct iovec remote = {(void *)(uintptr_t)addr, len};
    if (!len)
        return 0;
    long r = transfer_batch(pid, 1, (unsigned char *)src, &remote, 1, len, NULL);
    return r < 0 ? r : (long)len;
}

long pycr_mem_write(int pid, uint64_t addr, const unsigned char *src, size_t len)
{
    char path[64];
    size_t done = 0;
    snprintf(path, sizeof(path), "/proc/%d/mem", pid);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    while (done < len) {
        ssize_t w = pwrite(fd, src + done, len - done, (off_t)(addr + done));
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            long err = w < 0 ? -errno : -EIO;
            close(fd);
            return err;
        }
        done += (size_t)w;
    }
    close(fd);
    return (long)len;
}

/* ---- pagemap ---------------------------------------------------------- */

long pycr_pagemap_runs(int fd, uint64_t start, uint64_t end, uint64_t match,
                       uint64_t exclude, uint64_t *entries, size_t nentries,
                       uint64_t *out, size_t cap, uint64_t *resume)
{
    uint64_t addr = start & ~(PAGE_SZ - 1);
    uint64_t run_start = 0, run_len = 0;
    size_t n = 0;

    if (!cap || !nentries)
        return -EINVAL;
    while (addr < end) {
        uint64_t pages = (end - addr + PAGE_SZ - 1) / PAGE_SZ;
        if (pages > nentries)
            pages = nentries;
        ssize_t r = pread(fd, entries, pages * 8, (off_t)(addr / PAGE_SZ * 8));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r < 8)
            return -EIO;
        pages = (uint64_t)r / 8;
        for (uint64_t i = 0; i < pages; i++, addr += PAGE_SZ) {
            uint64_t e = entries[i];
            if (!(e & match) || (e & exclude))
                continue;
            if (run_len && run_start + run_len == addr) {
                run_len += PAGE_SZ;
                continue;
            }
            if (run_len) {
                out[2 * n] = run_start;
                out[2 * n + 1] = run_len;
                if (++n == cap) {
                    *resume = addr;
                    return (long)n;
                }
            }
            run_start = addr;
            run_len = PAGE_SZ;
        }
    }
    if (run_len) {
        out[2 * n] = run_start;
        out[2 * n + 1] = run_len;
        n++;
    }
    *resume = end;
    return (long)n;
}

/* struct pm_scan_arg, as in <linux/fs.h> (6.7+), spelled out so that older
 * userspace headers still build. */
struct pycr_pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
#define PYCR_PAGEMAP_SCAN 0xc0606610UL

long pycr_pagemap_scan(int fd, uint64_t start, uint64_t end, uint64_t flags,
                       uint64_t category_mask, uint64_t category_inverted,
                       uint64_t category_anyof_mask, uint64_t return_mask,
                       uint64_t max_pages, uint64_t *vec, size_t vec_len,
                       uint64_t *walk_end)
{
    struct pycr_pm_scan_arg arg = {
        .size = sizeof(arg), .flags = flags, .start = start, .end = end,
        .vec = (uint64_t)(uintptr_t)vec, .vec_len = vec_len,
        .max_pages = max_pages, .category_inverted = category_inverted,
        .category_mask = category_mask,
        .category_anyof_mask = category_anyof_mask, .return_mask = return_mask,
    };
    long r;
    do
        r = ioctl(fd, PYCR_PAGEMAP_SCAN, &arg);
    while (r < 0 && errno == EINTR);
    if (r < 0)
        return -errno;
    *walk_end = arg.walk_end;
    return r;
}

/* ---- page hashing ----------------------------------------------------- */

static inline uint64_t rotl64(uint64_t x, int r)
{
    return (x << r) | (x >> (64 - r));
}

/* Final avalanche: xor-shifts and odd multipliers, so that every input bit
 * reaches every output bit. */
static inline uint64_t avalanche(uint64_t h)
{
    h ^= h >> 31;
    h *= 0x9e6c63d0676a9a99ULL;
    h ^= h >> 29;
    h *= 0xa3b195354a39b70dULL;
    h ^= h >> 32;
    return h;
}

/* Four independent lanes over the page's 64-bit words (so the multiplies
 * pipeline); each step is invertible, so no word's change can cancel out
 * within its lane. */
static uint64_t hash_page(const unsigned char *p)
{
    const uint64_t k1 = 0xd6e8feb86659fd93ULL, k2 = 0xff51afd7ed558ccdULL;
    uint64_t v0 = 0x243f6a8885a308d3ULL, v1 = 0x13198a2e03707344ULL;
    uint64_t v2 = 0xa4093822299f31d0ULL, v3 = 0x082efa98ec4e6c89ULL;
    for (size_t i = 0; i < PAGE_SZ; i += 32) {
        uint64_t w[4];
        memcpy(w, p + i, 32);
        v0 = rotl64(v0 ^ (w[0] * k2), 27) * k1;
        v1 = rotl64(v1 ^ (w[1] * k2), 27) * k1;
        v2 = rotl64(v2 ^ (w[2] * k2), 27) * k1;
        v3 = rotl64(v3 ^ (w[3] * k2), 27) * k1;
    }
    uint64_t h = avalanche(v0) ^ rotl64(avalanche(v1), 16) ^
                 rotl64(avalanche(v2), 32) ^ rotl64(avalanche(v3), 48);
    return avalanche(h ^ PAGE_SZ);
}

void pycr_hash_pages(const unsigned char *buf, size_t npages, uint64_t *out)
{
    for (size_t i = 0; i < npages; i++)
        out[i] = hash_page(buf + i * PAGE_SZ);
}

/* ---- CRC-32C of pages files ------------------------------------------- */

/*
 * CRC-32C (Castagnoli, reflected polynomial 0x82f63b78, as iSCSI and ext4
 * use it), computed with the SSE4.2 crc32 instruction where the CPU has it.
 * One crc32 has a latency of 3 cycles and a throughput of 1, so three
 * independent streams over adjacent blocks are run at once and joined with
 * a "shift by n zero bytes" operator (Mark Adler's method): about three
 * times the speed of one stream, which keeps the checksum off the dump's
 * critical path.
 */
#define CRC32C_POLY 0x82f63b78U
#define CRC_LONG 8192
#define CRC_SHORT 256

static uint32_t crc32c_table[256];
static uint32_t crc32c_long[4][256], crc32c_short[4][256];
static int crc32c_have_hw;

static uint32_t gf2_matrix_times(const uint32_t *mat, uint32_t vec)
{
    uint32_t sum = 0;
    while (vec) {
        if (vec & 1)
            sum ^= *mat;
        vec >>= 1;
        mat++;
    }
    return sum;
}

static void gf2_matrix_square(uint32_t *square, const uint32_t *mat)
{
    for (int n = 0; n < 32; n++)
        square[n] = gf2_matrix_times(mat, mat[n]);
}

/* The operator that appends len (a power of two) zero bytes to a CRC. */
static void crc32c_zeros_op(uint32_t *even, size_t len)
{
    uint32_t odd[32], row = 1;
    odd[0] = CRC32C_POLY;               /* one zero bit */
    for (int n = 1; n < 32; n++) {
        odd[n] = row;
        row <<= 1;
    }
    gf2_matrix_square(even, odd);       /* two zero bits */
    gf2_matrix_square(odd, even);       /* four zero bits */
    do {
        gf2_matrix_square(even, odd);
        len >>= 1;
        if (!len)
            return;
        gf2_matrix_square(odd, even);
        len >>= 1;
    } while (len);
    memcpy(even, odd, sizeof(odd));
}

static void crc32c_zeros(uint32_t zeros[][256], size_t len)
{
    uint32_t op[32];
    crc32c_zeros_op(op, len);
    for (uint32_t n = 0; n < 256; n++) {
        zeros[0][n] = gf2_matrix_times(op, n);
        zeros[1][n] = gf2_matrix_times(op, n << 8);
        zeros[2][n] = gf2_matrix_times(op, n << 16);
        zeros[3][n] = gf2_matrix_times(op, n << 24);
    }
}

static inline uint32_t crc32c_shift(uint32_t zeros[][256], uint32_t crc)
{
    return zeros[0][crc & 0xff] ^ zeros[1][(crc >> 8) & 0xff] ^
           zeros[2][(crc >> 16) & 0xff] ^ zeros[3][crc >> 24];
}

__attribute__((constructor)) static void crc32c_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t crc = n;
        for (int k = 0; k < 8; k++)
            crc = crc & 1 ? (crc >> 1) ^ CRC32C_POLY : crc >> 1;
        crc32c_table[n] = crc;
    }
    crc32c_zeros(crc32c_long, CRC_LONG);
    crc32c_zeros(crc32c_short, CRC_SHORT);
    __builtin_cpu_init();
    crc32c_have_hw = __builtin_cpu_supports("sse4.2");
}

uint32_t pycr_crc32c_portable(uint32_t crc, const unsigned char *p, size_t len)
{
    crc = ~crc;
    while (len--)
        crc = (crc >> 8) ^ crc32c_table[(crc ^ *p++) & 0xff];
    return ~crc;
}

__attribute__((target("sse4.2")))
static uint32_t crc32c_hw(uint32_t crc, const unsigned char *next, size_t len)
{
    uint64_t crc0 = ~crc, crc1, crc2, w0, w1, w2;
    while (len && ((uintptr_t)next & 7)) {
        crc0 = __builtin_ia32_crc32qi((uint32_t)crc0, *next++);
        len--;
    }
    while (len >= 3 * CRC_LONG) {
        const unsigned char *end = next + CRC_LONG;
        crc1 = crc2 = 0;
        do {
            memcpy(&w0, next, 8);
            memcpy(&w1, next + CRC_LONG, 8);
            memcpy(&w2, next + 2 * CRC_LONG, 8);
            crc0 = __builtin_ia32_crc32di(crc0, w0);
            crc1 = __builtin_ia32_crc32di(crc1, w1);
            crc2 = __builtin_ia32_crc32di(crc2, w2);
            next += 8;
        } while (next < end);
        crc0 = crc32c_shift(crc32c_long, (uint32_t)crc0) ^ crc1;
        crc0 = crc32c_shift(crc32c_long, (uint32_t)crc0) ^ crc2;
        next += 2 * CRC_LONG;
        len -= 3 * CRC_LONG;
    }
    while (len >= 3 * CRC_SHORT) {
        const unsigned char *end = next + CRC_SHORT;
        crc1 = crc2 = 0;
        do {
            memcpy(&w0, next, 8);
            memcpy(&w1, next + CRC_SHORT, 8);
            memcpy(&w2, next + 2 * CRC_SHORT, 8);
            crc0 = __builtin_ia32_crc32di(crc0, w0);
            crc1 = __builtin_ia32_crc32di(crc1, w1);
            crc2 = __builtin_ia32_crc32di(crc2, w2);
            next += 8;
        } while (next < end);
        crc0 = crc32c_shift(crc32c_short, (uint32_t)crc0) ^ crc1;
        crc0 = crc32c_shift(crc32c_short, (uint32_t)crc0) ^ crc2;
        next += 2 * CRC_SHORT;
        len -= 3 * CRC_SHORT;
    }
    while (len >= 8) {
        memcpy(&w0, next, 8);
        crc0 = __builtin_ia32_crc32di(crc0, w0);
        next += 8;
        len -= 8;
    }
    while (len--)
        crc0 = __builtin_ia32_crc32qi((uint32_t)crc0, *next++);
    return ~(uint32_t)crc0;
}

uint32_t pycr_crc32c(uint32_t crc, const unsigned char *buf, size_t len)
{
    return crc32c_have_hw ? crc32c_hw(crc, buf, len) : pycr_crc32c_portable(crc, buf, len);
}

long pycr_sums_update(struct pycr_sums *s, const unsigned char *buf, size_t len)
{
    if (!s->chunk)
        return -EINVAL;
    while (len) {
        uint64_t take = s->chunk - s->pos % s->chunk;
        if (take > len)
            take = len;
        s->crc = pycr_crc32c(s->crc, buf, take);
        s->pos += take;
        buf += take;
        len -= take;
        if (s->pos % s->chunk == 0) {
            if (s->n >= s->cap)
                return -ENOSPC;
            s->out[s->n++] = s->crc;
            s->crc = 0;
        }
    }
    return 0;
}

long pycr_sums_fd(int fd, uint64_t offset, uint64_t len, unsigned char *buf,
                  size_t buflen, struct pycr_sums *s)
{
    buflen &= ~(PAGE_SZ - 1);
    if (!buflen)
        return -EINVAL;
    while (len) {
        /* Whole pages, so that an O_DIRECT fd accepts the tail too. */
        size_t want = len < buflen ? (size_t)len : buflen;
        want = (want + PAGE_SZ - 1) & ~(PAGE_SZ - 1);
        ssize_t r = pread(fd, buf, want, (off_t)offset);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -errno;
        if (r == 0)
            return -ENODATA;
        if ((uint64_t)r > len)
            r = (ssize_t)len;
        long e = pycr_sums_update(s, buf, (size_t)r);
        if (e < 0)
            return e;
        offset += (uint64_t)r;
        len -= (uint64_t)r;
    }
    return 0;
}

/* ---- raw syscalls ----------------------------------------------------- */

long pycr_syscall6(long nr, long a, long b, long c, long d, long e, long f)
{
    long r = syscall(nr, a, b, c, d, e, f);
    return r == -1 ? -errno : r;
}

/*
 * clone3 with chosen PIDs; the child execs `path` at once. The child is a
 * copy of the caller (no CLONE_VM), so it may run plain C until execve, but
 * never returns into the interpreter.
 */
long pycr_clone3_exec(const int *set_tid, size_t set_tid_size, uint64_t flags,
                      const char *path, char *const argv[])
{
    struct clone_args args;
    memset(&args, 0, sizeof(args));
    args.flags = flags;
    args.exit_signal = SIGCHLD;
    args.set_tid = (uint64_t)(uintptr_t)set_tid;
    args.set_tid_size = set_tid_size;
    pid_t parent = getpid();
    long pid = syscall(SYS_clone3, &args, sizeof(args));
    if (pid < 0)
        return -errno;
    if (pid == 0) {
        /* Until pycr seizes it (with PTRACE_O_EXITKILL), the stub must die
         * with pycr: a stub left behind would hold a PID of the tree. The
         * death signal survives execve; pycr clears it once it holds the
         * task. A parent already gone is seen as a new parent pid (0 when
         * the child is alone in a new PID namespace, where this cannot be told). */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        pid_t now = getppid();
        if (now != parent && now != 0)
            _exit(126);
        /* Start the program clean: default dispositions for what the
         * interpreter ignores, nothing blocked. */
        sigset_t none;
        sigemptyset(&none);
        signal(SIGPIPE, SIG_DFL);
        signal(SIGXFSZ, SIG_DFL);
        sigprocmask(SIG_SETMASK, &none, NULL);
        execve(path, argv, environ);
        _exit(127);
    }
    return pid;
}

void pycr_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t *out)
{
    uint32_t a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(leaf), "c"(subleaf));
    out[0] = a; out[1] = b; out[2] = c; out[3] = d;
}

uint64_t pycr_xgetbv(uint32_t idx)
{
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(idx));
    return ((uint64_t)hi << 32) | lo;
}
