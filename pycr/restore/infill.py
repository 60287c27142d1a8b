"""Filling a stopped task's memory from inside it: injected preadv of the pages file.

The task reads its pages file into place itself, as criu's restorer does: the
kernel moves the bytes from the file (with O_DIRECT: from the disk, by DMA)
straight into the task's own new pages, one copy and no round trip through
pycr. pycr opens the file (O_DIRECT where the filesystem allows it), the task
takes its own fd of it with pidfd_getfd through the pidfd of pycr every stub
inherits, and each injected preadv covers up to IOV_MAX runs of the pagemap,
one iovec per run, written as a struct iovec array into the task's scratch
area. Measured against pycr's pread + process_vm_writev in
benchmarks/fill_routes.py.

Short reads are resumed where they stopped; an O_DIRECT read the filesystem
refuses (EINVAL: alignment) is redone without O_DIRECT.
"""

import errno
import os
import struct

from pycr.errors import ImageError, RestoreError
from pycr.trackers.runs import ramp, split

IOV_MAX = os.sysconf("SC_IOV_MAX")   # iovecs per preadv (the kernel's UIO_MAXIOV)
BATCH_BYTES = 256 << 20         # bytes per preadv at most, so that progress shows on big fills
FIRST_BATCH = 8 << 20           # the first preadv's, doubling up to BATCH_BYTES: the bar moves soon on a
                                # small fill, and a large one still gets large reads (each is a synchronous
                                # disk round trip: 16 MiB batches made a 1 GiB fill 25 % slower)
IOVEC = struct.Struct("<QQ")


def open_pages(path, direct=True):
    """pycr's fd of a pages file: O_DIRECT where the filesystem allows it."""
    for flags in ((os.O_DIRECT, 0) if direct else (0,)):
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
        except FileNotFoundError:
            raise ImageError(path, "missing") from None
        except OSError:
            if not flags:
                raise
    raise AssertionError("unreachable")


def batches(runs, limit=BATCH_BYTES, count=IOV_MAX):
    """Split runs (addr, length pairs, read back to back) into lists of at most
    `count` (addr, length) iovecs and `limit` bytes each (a run may be split)."""
    sizes = ramp(min(FIRST_BATCH, limit), limit)
    return [list(zip(piece[::2], piece[1::2])) for piece, _size in split(runs, sizes, count)]


class TaskReader:
    """Reads one pages file into task memory with preadv run by the task itself.

    remote: a pycr.restore.remote.Remote (scratch area mapped); pidfd: the task's
    fd number of pycr's pidfd; path: the pages file; direct=False reads through the page cache.
    """

    def __init__(self, remote, pidfd, path, direct=True):
        self.remote = remote
        self.pidfd = pidfd
        self.path = path
        self.mine = open_pages(path, direct)
        self.task_fd = self._take(self.mine)

    def _take(self, mine):
        got = self.remote.call("pidfd_getfd", self.pidfd, mine, 0)
        if got < 0:
            raise RestoreError(f"pid {self.remote.pid}: pidfd_getfd of the pages file failed: "
                               f"{os.strerror(-got)}")
        return got

    def _buffered(self):
        """O_DIRECT was refused for this read: the same file without it from now on."""
        self.close()
        self.mine = open_pages(self.path, direct=False)
        self.task_fd = self._take(self.mine)

    def read(self, runs, offset, advance=None):
        """Fill runs (array of addr, length pairs) from the file, consecutively from offset.
        -> bytes read."""
        return run(self.remote, self.steps(runs, offset, advance))

    def steps(self, runs, offset, advance=None):
        """read() as a generator: it yields each preadv as (syscall name, args) and is sent
        its raw result, so that a driver (run, run_overlapped) may run the reads of several
        tasks at the same time. Returns the bytes read."""
        total = 0
        for iovs in batches(runs):
            want = sum(n for _, n in iovs)
            yield from self._read_batch(iovs, offset + total)
            total += want
            if advance:
                advance(want)
        return total

    def _read_batch(self, iovs, pos):
        r = self.remote
        direct_ok = True
        while iovs:
            r.reset_scratch()
            addr = r.put(b"".join(IOVEC.pack(a, n) for a, n in iovs))
            got = yield ("preadv", self.task_fd, addr, len(iovs), pos, 0)
            r.reset_scratch()
            if got == -errno.EINVAL and direct_ok:
                direct_ok = False
                self._buffered()
                continue
            if got == -errno.EINTR:
                continue
            if got < 0:
                raise RestoreError(f"pid {r.pid}: preadv of {self.path} failed: {os.strerror(-got)}")
            if got == 0:
                raise ImageError(self.path, "corrupt: the pages file ends before its pagemap does")
            pos += got
            iovs = _skip(iovs, got)

    def close(self):
        if self.task_fd >= 0:
            self.remote.call("close", self.task_fd)
            self.task_fd = -1
        self.close_mine()

    def close_mine(self):
        """Close pycr's own fd of the file (the task's stays: a failed restore kills the task)."""
        if self.mine >= 0:
            os.close(self.mine)
            self.mine = -1


def run(remote, steps):
    """Drive a steps() generator in one task, one call after the other -> its result."""
    try:
        request = next(steps)
        while True:
            request = steps.send(remote.call(*request))
    except StopIteration as done:
        return done.value


def run_overlapped(work):
    """Drive steps() generators of different tasks at the same time: [(remote, steps)] ->
    [result], in order. Every task gets its next call started as soon as pycr has its
    last result, so that their reads (each waiting on the disk) overlap; the results
    are collected in turn. A failure lets the calls still running end before it is raised."""
    results = [None] * len(work)
    running = {}                            # index -> (remote, steps), a call started
    try:
        for i, (remote, steps) in enumerate(work):
            _advance(i, remote, steps, None, running, results, first=True)
        while running:
            for i in list(running):
                remote, steps = running.pop(i)
                _advance(i, remote, steps, remote.finish_call(), running, results)
    except BaseException:
        for remote, _steps in running.values():
            try:
                remote.finish_call()
            except Exception:
                pass
        raise
    return results


def _advance(i, remote, steps, result, running, results, first=False):
    try:
        request = next(steps) if first else steps.send(result)
    except StopIteration as done:
        results[i] = done.value
        return
    remote.start(*request)
    running[i] = (remote, steps)


def _skip(iovs, done):
    """The iovecs left after `done` bytes were read into the first of them."""
    out = []
    for addr, length in iovs:
        if done >= length:
            done -= length
            continue
        out.append((addr + done, length - done))
        done = 0
    return out
