"""Filling restored memory from pages files, including pages kept by earlier passes.

A dump at the end of a pre-dump chain marks runs "in_parent": their bytes sit
in the pages file of a previous image directory (which may itself point
further back). PageChain resolves every run of an owner to (directory level,
file offset) pieces once, then fills the task by one of two routes:
- in the task (the default for a restore): the stub reads each pages file
  into place itself with injected preadv, up to IOV_MAX runs per call
  (pycr.restore.infill); one copy, by the kernel, from the file to the task;
- from pycr (a task without pycr's pidfd, such as one sharing its parent's
  already restored fd table, or a replica task forked late): preads into
  pycr's buffers overlapped with process_vm_writev (stream_pages).
Shared objects (memfds, segments, ghost files) are written by pycr (fill_fd).
"""

import bisect
import errno
import mmap
import os
import queue
import threading
from array import array

from pycr.abi import MAP_ANONYMOUS, MAP_POPULATE, MAP_PRIVATE
from pycr.errors import ImageError, RestoreError
from pycr.images import iter_page_runs
from pycr.log import Progress, log
from pycr.native import core
from pycr.restore import bounds, infill
from pycr.trackers.runs import split
from pycr.sysinfo import page_size

PAGE = page_size()
MAX_CHAIN = 256
CHUNK = 64 << 20        # bytes per native call, so that progress shows on big copies


STREAM_PIECE = 16 << 20     # bytes read from the pages file per pread
STREAM_BUFFERS = 3


def stream_buffers():
    """Prefaulted buffers for stream_pages (cold memory costs a fault per page there).
    Their owner (a PageChain: one per restore or replica) closes them when done."""
    flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE
    return [mmap.mmap(-1, STREAM_PIECE, flags=flags) for _ in range(STREAM_BUFFERS)]


def stream_pages(pid, fd, offset, runs, buffers, advance=None):
    """Write `runs` of task pid from the pages file fd, read consecutively from offset,
    through `buffers` (from stream_buffers; no other call may use them meanwhile).

    A reader thread preads the next piece (O_DIRECT: no page cache to allocate)
    while this thread process_vm_writev's the previous one into the task, so
    the disk and the target's page allocation work at the same time; from a
    file not in the page cache this is about 2.5 times faster than copying
    from an mmap of it. Returns bytes written.
    """
    free, full = queue.Queue(), queue.Queue()
    for buf in buffers:
        free.put(buf)
    stop = threading.Event()

    def reader():
        pos = offset
        try:
            for piece, size in split(runs, STREAM_PIECE):
                buf = free.get()
                if stop.is_set():
                    return
                view, done = memoryview(buf)[:size], 0
                while done < size:
                    n = os.preadv(fd, [view[done:]], pos + done)
                    if n == 0:
                        raise OSError(errno.ENODATA, "the pages file ends before its pagemap does")
                    done += n
                view.release()
                full.put((buf, piece, size))
                pos += size
            full.put(None)
        except BaseException as exc:     # handed to the writer, which raises it
            full.put(exc)

    thread = threading.Thread(target=reader, name="pycr-pages-reader", daemon=True)
    thread.start()
    total = 0
    try:
        while True:
            item = full.get()
            if item is None:
                return total
            if isinstance(item, BaseException):
                raise item
            buf, piece, size = item
            total += core.vm_write_runs(pid, piece, buf, 0)
            free.put(buf)
            if advance:
                advance(size)
    finally:
        stop.set()
        for _ in buffers:
            free.put(None)       # wake the reader if it waits for a buffer
        thread.join()


def map_pages_file(path):
    """A read-only mmap of a pages file (b"" when it is empty)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ImageError(path, "missing") from None
    try:
        size = os.fstat(fd).st_size
        if not size:
            return b""
        mapped = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    mapped.madvise(mmap.MADV_SEQUENTIAL)
    return mapped


def outside(pieces, skip):
    """The (level, addr, length, offset) pieces clipped to what lies outside every
    (start, end, ...) range of skip."""
    if not skip:
        return pieces
    ranges = sorted((r[0], r[1]) for r in skip)
    out = []
    for level, addr, length, offset in pieces:
        end = addr + length
        for start, stop in ranges:
            if stop <= addr or start >= end:
                continue
            if start > addr:
                out.append((level, addr, start - addr, offset))
            offset += min(stop, end) - addr
            addr = min(stop, end)
        if addr < end:
            out.append((level, addr, end - addr, offset))
    return out


class PageChain:
    """The pages of one dump and of the image dirs it builds on (level 0 is the dump)."""

    def __init__(self, imgdir):
        self.dirs = [imgdir]
        self._pagemaps = {}
        self._index = {}
        self._maps = {}
        self._buffers = None        # stream_buffers(), made at the first fill_task

    # -- directories and pagemaps
    def dir(self, level):
        while len(self.dirs) <= level:
            if len(self.dirs) > MAX_CHAIN:
                raise ImageError(self.dirs[0].path, f"image chain longer than {MAX_CHAIN} dirs (a loop?)")
            parent = self.dirs[-1].parent()
            if parent is None:
                raise ImageError(self.dirs[-1].path_of("pagemap", "*"),
                                 "pages are marked in_parent but inventory.img names no parent")
            if not os.path.isdir(parent.path):
                raise ImageError(parent.path, "parent image directory is missing")
            self.dirs.append(parent)
        return self.dirs[level]

    def pagemap(self, level, owner):
        key = (level, owner)
        if key not in self._pagemaps:
            pagemap = self.dir(level).read("pagemap", owner)
            bounds.check_runs(self.dir(level).path_of("pagemap", owner), pagemap)
            self._pagemaps[key] = pagemap
        return self._pagemaps[key]

    def _entries(self, level, owner):
        """(starts, [(vaddr, end, in_parent, offset)]) of one pagemap, for bisecting."""
        key = (level, owner)
        if key not in self._index:
            rows = [(v, v + n * PAGE, inp, off) for v, n, inp, off in iter_page_runs(self.pagemap(level, owner))]
            rows.sort()
            self._index[key] = ([r[0] for r in rows], rows)
        return self._index[key]

    def saved_bytes(self, owner):
        """Bytes a fill of owner writes: its pagemap's runs, wherever in the chain they are."""
        return sum(nr for _, nr, _, _ in iter_page_runs(self.pagemap(0, owner))) * PAGE

    # -- resolution
    def _resolve(self, level, owner, start, end, out):
        """Append (level, addr, length, file offset) pieces covering [start, end)."""
        starts, rows = self._entries(level, owner)
        i = max(bisect.bisect_right(starts, start) - 1, 0)
        addr = start
        while addr < end:
            if i >= len(rows) or rows[i][0] > addr or rows[i][1] <= addr:
                if i < len(rows) and rows[i][1] <= addr:
                    i += 1
                    continue
                where = self.dir(level).path_of("pagemap", owner)
                raise ImageError(where, f"pages at {addr:#x} of {owner} are marked in_parent "
                                        "but the parent does not hold them")
            vaddr, vend, in_parent, offset = rows[i]
            stop = min(vend, end)
            if in_parent:
                self._resolve(level + 1, owner, addr, stop, out)
            else:
                out.append((level, addr, stop - addr, offset + (addr - vaddr)))
            addr = stop
            i += 1

    def pieces(self, owner, start=0, end=None):
        """Every saved run of owner as (level, addr, length, offset), in dump order;
        only what lies in [start, end) when end is given."""
        out = []
        for vaddr, nr, in_parent, offset in iter_page_runs(self.pagemap(0, owner)):
            lo, hi = vaddr, vaddr + nr * PAGE
            if end is not None:
                lo, hi = max(lo, start), min(hi, end)
                if lo >= hi:
                    continue
            if in_parent:
                self._resolve(1, owner, lo, hi, out)
            else:
                out.append((0, lo, hi - lo, offset + (lo - vaddr)))
        return out

    def read(self, owner, addr, length):
        """The saved bytes of [addr, addr+length) of owner; pages saved nowhere read as zeros."""
        out = bytearray(length)
        if not self.dirs[0].exists("pagemap", owner):
            return bytes(out)
        for level, start, size, offset in self.pieces(owner, addr, addr + length):
            src = self._source(level, owner)
            out[start - addr:start - addr + size] = src[offset:offset + size]
        return bytes(out)

    def check_resolvable(self, owner):
        """Raise ImageError now if any in_parent run cannot be found."""
        for vaddr, nr, in_parent, _ in iter_page_runs(self.pagemap(0, owner)):
            if in_parent:
                self._resolve(1, owner, vaddr, vaddr + nr * PAGE, [])

    # -- data
    def _source(self, level, owner):
        key = (level, owner)
        if key not in self._maps:
            self._maps[key] = map_pages_file(self.dir(level).pages_path(owner))
        return self._maps[key]

    def close(self):
        for m in self._maps.values():
            if isinstance(m, mmap.mmap):
                m.close()
        self._maps.clear()
        for buf in self._buffers or ():
            buf.close()
        self._buffers = None

    def batches(self, owner, chunk=CHUNK, skip=()):
        """(level, runs array, file offset): runs read back to back from that offset;
        nothing inside the (start, end, ...) ranges of skip (served lazily)."""
        out = []
        for level, addr, length, offset in outside(self.pieces(owner), skip):
            if out and out[-1][0] == level and out[-1][3] == offset and out[-1][4] < chunk:
                last = out[-1]
                last[1].extend((addr, length))
                last[3] = offset + length
                last[4] += length
            else:
                out.append([level, array("Q", (addr, length)), offset, offset + length, length])
        return [(level, runs, start) for level, runs, start, _, _ in out]

    def _open_pages(self, level, owner):
        """The pages file for streaming: O_DIRECT where the filesystem allows it."""
        path = self.dir(level).pages_path(owner)
        for flags in (os.O_DIRECT, 0):
            try:
                return os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
            except FileNotFoundError:
                raise ImageError(path, "missing") from None
            except OSError:
                continue
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def fill_task(self, pid, owner, remote=None, pidfd=-1, skip=()):
        """Write every saved page of owner into task pid (VMAs must be writable), but those in
        the ranges of skip. -> bytes.

        With remote (the task, stopped, its scratch area mapped) and pidfd (its fd of
        pycr's pidfd), the task reads the pages in itself; else pycr writes them."""
        if remote is not None and pidfd >= 0:
            return self._fill_in_task(remote, pidfd, owner, skip)
        total = 0
        batches = self.batches(owner, skip=skip)
        size = sum(sum(runs[1::2]) for _, runs, _ in batches)
        if self._buffers is None:
            self._buffers = stream_buffers()
        with Progress(f"pid {pid} memory", size) as progress:
            for level, runs, offset in batches:
                fd = self._open_pages(level, owner)
                try:
                    total += stream_pages(pid, fd, offset, runs, self._buffers, progress.advance)
                except OSError as exc:
                    raise RestoreError(f"pid {pid}: filling memory: {exc.strerror}") from None
                finally:
                    os.close(fd)
        log.info("pid %d: wrote %d pages in %d batches: pread of the pages file overlapped "
                 "with process_vm_writev", pid, total // PAGE, len(batches))
        return total

    def _fill_in_task(self, remote, pidfd, owner, skip=()):
        """fill_task by injected preadv: one TaskReader (fd in the task) per pages file."""
        batches = self.batches(owner, infill.BATCH_BYTES, skip)
        size = sum(sum(runs[1::2]) for _, runs, _ in batches)
        readers, total = {}, 0
        try:
            with Progress(f"pid {remote.pid} memory", size) as progress:
                for level, runs, offset in batches:
                    if level not in readers:
                        readers[level] = infill.TaskReader(remote, pidfd, self.dir(level).pages_path(owner))
                    total += readers[level].read(runs, offset, progress.advance)
        finally:
            for reader in readers.values():
                reader.close()
        log.info("pid %d: read %d pages into place with %d injected preadv batches from %d pages "
                 "file(s)", remote.pid, total // PAGE, len(batches), len(readers))
        return total

    def fill_tasks(self, work):
        """fill_task for several tasks, their reads overlapped: work is [(remote, pidfd, owner,
        skip)], each task stopped with its scratch area mapped and its own fd of pycr's
        pidfd. While one task's preadv waits on the disk, the others' run (the wait is
        the task's, not pycr's) -> [bytes] in order."""
        if len(work) == 1:
            remote, pidfd, owner, skip = work[0]
            return [self.fill_task(remote.real, owner, remote, pidfd, skip)]
        plans = [(remote, pidfd, owner, self.batches(owner, infill.BATCH_BYTES, skip))
                 for remote, pidfd, owner, skip in work]
        size = sum(sum(runs[1::2]) for *_, batches in plans for _, runs, _ in batches)
        with Progress(f"memory of {len(plans)} processes", size) as progress:
            done = infill.run_overlapped([(remote, self._fill_steps(remote, pidfd, owner, batches, progress.advance))
                                          for remote, pidfd, owner, batches in plans])
        for (remote, _pidfd, _owner, batches), total in zip(plans, done):
            log.info("pid %d: read %d pages into place with %d injected preadv batches from %d pages "
                     "file(s), overlapped with %d other processes' reads", remote.pid, total // PAGE,
                     len(batches), len({level for level, _, _ in batches}), len(plans) - 1)
        return done

    def _fill_steps(self, remote, pidfd, owner, batches, advance):
        """The in-task fill of one task as a generator of injected calls (infill.TaskReader.steps)."""
        readers, total, ended = {}, 0, False
        try:
            for level, runs, offset in batches:
                if level not in readers:
                    readers[level] = infill.TaskReader(remote, pidfd, self.dir(level).pages_path(owner))
                total += yield from readers[level].steps(runs, offset, advance)
            ended = True
        finally:
            for reader in readers.values():
                if ended:
                    reader.close()
                else:
                    reader.close_mine()      # the task may be mid-call: its fd goes with it
        return total

    def fill_fd(self, fd, owner):
        """Write every saved page of a shared object into fd (its offset = the run's vaddr)."""
        total = 0
        for level, addr, length, offset in self.pieces(owner):
            src = memoryview(self._source(level, owner))[offset:offset + length]
            done = 0
            while done < length:
                done += os.pwrite(fd, src[done:], addr + done)
            src.release()
            total += length
        return total
