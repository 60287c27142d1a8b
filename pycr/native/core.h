/*
 * The native core of pycr: the bulk memory paths and the few syscalls that
 * Python cannot make well. Every function returns >= 0 on success and
 * -errno on failure; the Python wrappers in core.py turn that into OSError.
 *
 * ffi_build.py feeds the declarations between the CDEF markers to cffi, so
 * keep them free of preprocessor lines.
 */
#ifndef PYCR_CORE_H
#define PYCR_CORE_H
#include <stdint.h>
#include <stddef.h>

/* CDEF-BEGIN */
/* Running CRC-32C sums of a byte stream, one per `chunk` bytes: the pages
 * file checksums. `crc` is the sum of the unfinished chunk so far; each
 * finished chunk's sum is appended to out (-ENOSPC once n reaches cap). */
struct pycr_sums {
    uint64_t chunk;
    uint64_t pos;
    uint32_t crc;
    uint32_t *out;
    size_t cap;
    size_t n;
};
uint32_t pycr_crc32c(uint32_t crc, const unsigned char *buf, size_t len);
uint32_t pycr_crc32c_portable(uint32_t crc, const unsigned char *buf, size_t len);
long pycr_sums_update(struct pycr_sums *s, const unsigned char *buf, size_t len);
/* buf (buflen bytes, whole pages: fd may be O_DIRECT) is the caller's. */
long pycr_sums_fd(int fd, uint64_t offset, uint64_t len, unsigned char *buf,
                  size_t buflen, struct pycr_sums *s);

/* 0: read and write one batch after the other (for benchmarks/copy_loop.py). */
void pycr_set_copy_overlap(int on);
/* buf (the caller's, buflen bytes) carries each batch from the task to fd;
 * sums may be NULL, otherwise every byte written to fd is summed too. */
long pycr_vm_read_runs(int pid, const uint64_t *runs, size_t nruns, int fd,
                       unsigned char *buf, size_t buflen,
                       uint64_t *fail_addr, struct pycr_sums *sums);
long pycr_vm_write_runs(int pid, const uint64_t *runs, size_t nruns,
                        const unsigned char *src, uint64_t *fail_addr);
long pycr_vm_read(int pid, uint64_t addr, unsigned char *dst, size_t len);
long pycr_vm_write(int pid, uint64_t addr, const unsigned char *src, size_t len);
long pycr_mem_write(int pid, uint64_t addr, const unsigned char *src, size_t len);

/* Runs of pages whose pagemap entry has a bit of `match` and none of
 * `exclude`; entries (nentries words, the caller's) holds each pread. */
long pycr_pagemap_runs(int fd, uint64_t start, uint64_t end, uint64_t match,
                       uint64_t exclude, uint64_t *entries, size_t nentries,
                       uint64_t *out, size_t cap, uint64_t *resume);
long pycr_pagemap_scan(int fd, uint64_t start, uint64_t end, uint64_t flags,
                       uint64_t category_mask, uint64_t category_inverted,
                       uint64_t category_anyof_mask, uint64_t return_mask,
                       uint64_t max_pages, uint64_t *vec, size_t vec_len,
                       uint64_t *walk_end);

void pycr_hash_pages(const unsigned char *buf, size_t npages, uint64_t *out);

long pycr_syscall6(long nr, long a, long b, long c, long d, long e, long f);
long pycr_clone3_exec(const int *set_tid, size_t set_tid_size, uint64_t flags,
                      const char *path, char *const argv[]);
/* CPUID leaf/subleaf into out[eax, ebx, ecx, edx]; XGETBV of register idx
 * (0 = XCR0, the state components the kernel enabled). */
void pycr_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t *out);
uint64_t pycr_xgetbv(uint32_t idx);

/* The lazy-pages fault server (faults.c). A page source file: fd (the
 * caller's), its size, and the CRC-32C of each `chunk` bytes (the manifest's). */
struct pycr_lazy_file {
    int fd;
    uint64_t size;
    const uint32_t *sums;
    size_t nsums;
    uint8_t *ready;     /* NULL: the whole file is there; else one state per chunk (faults.c) */
};
/* One saved run of a task: [start, start+len) comes from `file` at `offset`. */
struct pycr_lazy_run {
    uint64_t start, len;
    uint32_t file, flags;
    uint64_t offset;
};
enum { PYCR_LAZY_WIPEONFORK = 1 };
struct pycr_lazy_stats {
    uint64_t faults, fault_pages, pushed_pages, zero_pages, dropped, forks, uffds;
    int error;
    char message[120];
};
struct pycr_lazy;
struct pycr_lazy *pycr_lazy_new(const struct pycr_lazy_file *files, size_t nfiles,
                                uint64_t chunk, uint64_t readahead);
/* The server owns uffd from here on; runs sorted by start. Any thread. */
long pycr_lazy_add(struct pycr_lazy *s, int uffd, const struct pycr_lazy_run *runs, size_t nruns);
/* A remote source: faults write (u32 file, u32 chunk) to request_fd for a chunk not there
 * yet and wait; the caller pokes the eventfd arrived_fd whenever a chunk lands. Both the caller's. */
void pycr_lazy_set_remote(struct pycr_lazy *s, int request_fd, int arrived_fd);
void pycr_lazy_finish_input(struct pycr_lazy *s);
void pycr_lazy_stop(struct pycr_lazy *s);
/* No background push before this CLOCK_MONOTONIC time (ns); faults are served at once. */
void pycr_lazy_push_from(struct pycr_lazy *s, uint64_t when_ns);
/* The serving loop: returns 0 once input is finished and every page placed. */
long pycr_lazy_serve(struct pycr_lazy *s);
void pycr_lazy_stats(struct pycr_lazy *s, struct pycr_lazy_stats *out, uint64_t *left);
size_t pycr_lazy_fault_times(struct pycr_lazy *s, uint64_t *out, size_t cap);
void pycr_lazy_free(struct pycr_lazy *s);
/* CDEF-END */

#endif
