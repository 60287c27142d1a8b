"""Memory contents: which pages to save, and copying them into the pages file.

Only pages that cannot be found elsewhere are saved: every present or swapped
page of private anonymous memory; of private file mappings only the pages that
were copied on write (pagemap says "anonymous"); shared anonymous objects once
per object, through /proc/PID/map_files and SEEK_DATA; nothing of shared file
mappings (the file holds it) or of vdso/vvar (the kernel provides them).
Runs of pages go to the native core, which copies them with process_vm_readv
in large batches: no per-page Python object on this path.
"""

import bisect
import fcntl
import os
from array import array

from .. import options, proc
from ..errors import AccessDenied, PycrError
from ..native import core
from ..log import Progress, log
from ..stats import count, phase
from ..sysinfo import page_size
from ..trackers.runs import ramp, split

PAGE = page_size()
SKIPPED_KINDS = {"vdso", "vvar", "vvar_vclock", "vsyscall"}
MEM_CHUNK = 64 << 20     # bytes per native copy call at most (the first ones are smaller: ramp)
FIRST_CHUNK = 4 << 20    # the first call's, so that the progress bar moves soon on a small copy


def private_vmas(vmas):
    """The VMA records whose pages belong to this process alone."""
    return [v for v in vmas if not v["shared"] and v["kind"] not in SKIPPED_KINDS]


def shmem_vmas(vmas):
    """One VMA record per shared object it maps (the first that maps it): shared anonymous
    memory, SysV segments and memfds, also a memfd mapped privately (its file is in memory only)."""
    seen, out = set(), []
    for v in vmas:
        if (v["kind"] == "shmem" or v["path"].startswith("/memfd:")) and v["shmem_id"] not in seen:
            seen.add(v["shmem_id"])
            out.append(v)
    return out


def swap_in_use():
    """True if any swap device is active. Without one, no page can be swapped out,
    and pagemap's "swapped" bit only marks PTE markers (userfaultfd write-protect
    on a page never touched), which hold nothing worth saving."""
    try:
        return len(proc.read_system("swaps").splitlines()) > 1
    except PycrError:
        return True


def present_runs(pid, vmas):
    """(start, len) runs, flattened in an array('Q'), of the pages of `vmas` worth saving."""
    with phase("/proc reads"):
        swapped = swap_in_use()
        runs = array("Q")
        fd = proc.open_pagemap(pid)
        try:
            for v in vmas:
                anon_only = v["kind"] == "file"
                runs.extend(core.pagemap_runs(fd, v["start"], v["end"], True, swapped, anon_only))
        finally:
            os.close(fd)
    count("pages scanned", sum((v["end"] - v["start"]) // PAGE for v in vmas))
    from ..ptrace import narrate
    if narrate.enabled():
        narrate.log.debug("pid %d: present or swapped pages of its %d private VMAs (one PAGEMAP_SCAN each where "
                          "the kernel has it; file pages left out of file mappings) = %d runs, %d pages", pid,
                          len(vmas), len(runs) // 2, sum(runs[1::2]) // PAGE)
    return runs


def runs_to_entries(runs, in_parent=False):
    """pagemap image entries for runs (no per-page objects: one dict per run)."""
    if in_parent:
        count("pages skipped (in parent)", sum(runs[1::2]) // PAGE)
    return [(runs[i], runs[i + 1] // PAGE, in_parent) for i in range(0, len(runs), 2)]


def split_by_readability(runs, vmas):
    """Split runs into batches: (readable, runs) in address order.

    process_vm_readv honours protections, so pages of a PROT_NONE or write-only
    VMA are read through /proc/PID/mem, which the kernel lets a tracer read anyway.
    Readability is judged per VMA: a run (merged by a tracker across VMAs) that
    crosses into an unreadable VMA is cut at the boundary, in order.
    """
    unreadable = sorted((v["start"], v["end"]) for v in vmas if not v["prot"] & 1)
    if not unreadable:
        return [(True, runs)]
    starts = [s for s, _ in unreadable]
    batches = []

    def add(readable, start, length):
        if not batches or batches[-1][0] != readable:
            batches.append((readable, array("Q")))
        batches[-1][1].extend((start, length))

    for i in range(0, len(runs), 2):
        addr, end = runs[i], runs[i] + runs[i + 1]
        j = max(bisect.bisect_right(starts, addr) - 1, 0)
        while addr < end:
            while j < len(unreadable) and unreadable[j][1] <= addr:
                j += 1
            if j < len(unreadable) and unreadable[j][0] <= addr:
                stop = min(end, unreadable[j][1])
                add(False, addr, stop - addr)
            else:
                stop = min(end, unreadable[j][0]) if j < len(unreadable) else end
                add(True, addr, stop - addr)
            addr = stop
    return batches


def set_direct_io(fd, on):
    """Turn O_DIRECT on or off for fd; False where the filesystem refuses it.

    The pages file is written from the native core's page-aligned buffer in
    page multiples, so it can bypass the page cache: on a VM whose fresh page
    cache costs a first-touch fault per page, this is several times faster
    than buffered writes followed by the fsync that atomic images need.
    """
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    want = flags | os.O_DIRECT if on else flags & ~os.O_DIRECT
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, want)
    except OSError:
        return False
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT) == on


def copy_runs(pid, runs, vmas, out, progress=None):
    """Copy the runs' bytes from task pid to out, in run order. Returns bytes written.

    out is a pages writer (checksum.PagesFile: every byte is summed on the
    way) or a bare fd. Its fd is left as it came (without O_DIRECT), also
    when the copy fails.
    """
    sums = getattr(out, "sums", None)
    drain = getattr(out, "drain", None)
    direct = getattr(out, "direct", True)
    out_fd = out if isinstance(out, int) else out.fileno()
    try:
        with phase("page copy"):
            if options.current().lazy_anon and sums is not None:
                written = _copy_leaving_lazy(pid, runs, vmas, out_fd, sums, progress, direct)
            else:
                written = _copy_batches(pid, runs, vmas, out_fd, sums, progress, drain, direct)
        count("pages written", written // PAGE)
        return written
    finally:
        set_direct_io(out_fd, False)


def split_lazy(runs, vmas):
    """[(lazy, array('Q') runs)] in address order: runs inside the VMAs a lazy restore serves on
    fault (private anonymous: restore.lazy.is_lazy_vma) are lazy."""
    from ..restore.lazy import is_lazy_vma
    spans = sorted((v["start"], v["end"]) for v in vmas if is_lazy_vma(v["shared"], v["kind"], v["vmflags"]))
    starts = [s for s, _ in spans]
    out = []
    for i in range(0, len(runs), 2):
        addr, length = runs[i], runs[i + 1]
        j = bisect.bisect_right(starts, addr) - 1
        lazy = j >= 0 and spans[j][0] <= addr < spans[j][1]
        if not out or out[-1][0] != lazy:
            out.append((lazy, array("Q")))
        out[-1][1].extend((addr, length))
    return out


_ZEROS = bytes(1 << 20)


def write_hole(fd, sums, length):
    """length bytes of hole in a pages file (reads as zeros), summed as the zeros they read as."""
    os.lseek(fd, length, os.SEEK_CUR)
    while length:
        n = min(length, len(_ZEROS))
        sums.update(memoryview(_ZEROS)[:n])
        length -= n


def _copy_leaving_lazy(pid, runs, vmas, out_fd, sums, progress, direct=True):
    """As _copy_batches, but the pages of lazy runs stay in the (frozen) task: a hole in the file,
    which the lazy source fills from the task on request (pycr.lazy.remote_source)."""
    written = 0
    for lazy, batch in split_lazy(runs, vmas):
        if lazy:
            write_hole(out_fd, sums, sum(batch[1::2]))
        else:
            written += _copy_batches(pid, batch, vmas, out_fd, sums, progress, direct=direct)
    end = os.lseek(out_fd, 0, os.SEEK_CUR)
    if os.fstat(out_fd).st_size < end:
        os.ftruncate(out_fd, end)
    return written


def _chunks(batch, limit=MEM_CHUNK):
    """The runs of batch in pieces of at most `limit` bytes (a longer run is cut), the first
    ones smaller (FIRST_CHUNK, doubling), so that the progress bar moves soon on a small copy."""
    return split(batch, ramp(min(FIRST_CHUNK, limit), limit))


def _copy_batches(pid, runs, vmas, out_fd, sums, progress, drain=None, direct=True):
    """drain() (a page server's file) sends what was written to out_fd after each chunk.
    direct: bypass the page cache (set_direct_io) where the pages are readable."""
    total = 0
    for readable, batch in split_by_readability(runs, vmas):
        set_direct_io(out_fd, readable and direct)
        if readable:
            # Chunk so that a terminal shows progress on large copies, and a page
            # server's staging file holds at most one chunk.
            for chunk, size in _chunks(batch):
                total += core.vm_read_runs(pid, chunk, out_fd, sums)
                if drain:
                    drain()
                if progress:
                    progress.advance(size)
        else:
            mem = proc.open_mem(pid)
            try:
                for i in range(0, len(batch), 2):
                    data = os.pread(mem, batch[i + 1], batch[i])
                    _write_all(out_fd, data)
                    if sums is not None:
                        sums.update(data)
                    total += len(data)
                    if drain:
                        drain()
            finally:
                os.close(mem)
    return total


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def dump_private_memory(pid, vmas, imgdir, runs=None, parent_runs=None, src=None):
    """Write pages-<pid>.img and pagemap-<pid>.img; returns bytes of pages written.

    runs: the runs to save (default: every present page). parent_runs: runs
    whose pages are unchanged since the previous image set (pre-dump chains).
    src: the task to read from (a live thread when the leader has exited).
    """
    src = src or pid
    mine = private_vmas(vmas)
    if runs is None:
        runs = present_runs(src, mine)
    size = sum(runs[1::2])
    log.info("pid %d: copying %d pages in %d runs with process_vm_readv", pid, size // PAGE, len(runs) // 2)
    with Progress(f"pid {pid} memory", size) as progress, imgdir.pages_writer(str(pid)) as f:
        written = copy_runs(src, runs, mine, f, progress)
    entries = runs_to_entries(runs) + runs_to_entries(parent_runs or array("Q"), in_parent=True)
    entries.sort()
    imgdir.write("pagemap", {"owner": str(pid), "entries": entries}, str(pid))
    return written


def shmem_data_runs(fd, size):
    """(offset, len) runs of a file that hold data, by SEEK_DATA/SEEK_HOLE, widened
    to whole pages (the last one past the end of a file whose size is not a page multiple)."""
    runs = array("Q")
    off = 0
    while off < size:
        try:
            data = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:
            break   # ENXIO: no data past off
        if data >= size:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        start, end = data & ~(PAGE - 1), (hole + PAGE - 1) & ~(PAGE - 1)
        if runs and runs[-2] + runs[-1] >= start:
            runs[-1] = max(runs[-2] + runs[-1], end) - runs[-2]
        else:
            runs.extend((start, end - start))
        off = hole
    return runs


def dump_file_pages(fd, size, owner, imgdir):
    """Save the data of a file (an shmem object, a memfd, a deleted file) as pages-<owner>.img
    and pagemap-<owner>.img, offsets as addresses; the last page is padded with zeros. Returns bytes."""
    runs = shmem_data_runs(fd, size)
    written = 0
    with imgdir.pages_writer(owner) as f:
        for i in range(0, len(runs), 2):
            off, length = runs[i], runs[i + 1]
            while length:
                data = os.pread(fd, min(length, MEM_CHUNK), off)
                if not data:
                    data = bytes(length)        # past the end of the file: the page's tail
                f.write(data)
                off += len(data)
                length -= len(data)
                written += len(data)
    imgdir.write("pagemap", {"owner": owner, "entries": runs_to_entries(runs)}, owner)
    return written


def dump_shmem(pid, vma, imgdir):
    """Save one shared object once, through /proc/PID/map_files. Returns bytes."""
    owner = f"shmem-{vma['shmem_id']}"
    if imgdir.exists("pagemap", owner):
        return 0
    try:
        fd = proc.open_map_file(pid, vma["start"], vma["end"])
    except AccessDenied:
        raise AccessDenied(f"pid {pid}: shared memory at {vma['start']:#x}: reading it through "
                           "/proc/PID/map_files needs CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN") from None
    try:
        size = os.fstat(fd).st_size or (vma["end"] - vma["start"] + vma["pgoff"])
        return dump_file_pages(fd, size, owner, imgdir)
    finally:
        os.close(fd)
