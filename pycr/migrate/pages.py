"""Writing a pass's memory into the replica, and the shared objects it maps.

Per pass and task three kinds of writes, all process_vm_writev straight from
an mmap of the pages files (no copy through Python):
- write_delta: the runs the pass itself holds (not in_parent): the pages
  written on the source since the previous pass;
- write_resolved: for ranges mapped anew in the replica (a new task, a moved
  or re-backed VMA), the in_parent runs too, found up the chain;
- zero_absent: replica pages the source no longer has (MADV_DONTNEED'd, or
  inherited by fork and never present in the child) are dropped with
  madvise(MADV_DONTNEED), which gives zeros, or the file's bytes in a private
  file mapping, exactly as the source reads them. After every pass the
  replica holds exactly the pages of the pass's pagemap, so the next pass
  can tell what to drop from the two pagemaps alone, without reading the
  replica's page tables during the downtime.
Shared objects (memfds, shared memory, deleted files, SysV segments) are
not written here: they are the restorer's, refilled every pass
(Restore.refresh_shared).
"""

import bisect
import mmap
import os
from array import array

from pycr import proc, progress
from pycr.abi import MADV_DONTNEED
from pycr.errors import RestoreError
from pycr.images import iter_page_runs
from pycr.log import log
from pycr.native import core
from pycr.restore.memory import map_pages_file
from pycr.stats import phase
from pycr.trackers import runs as R
from pycr.sysinfo import page_size

PAGE = page_size()
SPECIAL = ("vdso", "vvar", "vvar_vclock", "vsyscall")


def delta_runs(chain, owner):
    """Runs the pass holds itself, in pages-file order (their bytes are back to back)."""
    runs = array("Q")
    for vaddr, nr, in_parent, _ in iter_page_runs(chain.pagemap(0, owner)):
        if not in_parent:
            runs.extend((vaddr, nr * PAGE))
    return runs


def coverage(chain, owner):
    """Runs of every page the source had at this pass (saved here or in a parent)."""
    return R.normalize(array("Q", [x for vaddr, nr, _, _ in iter_page_runs(chain.pagemap(0, owner))
                                   for x in (vaddr, nr * PAGE)]))


def _clip(pieces, ranges):
    """Parts of (level, addr, length, offset) pieces inside ranges (runs)."""
    spans = R.pairs(ranges)
    starts = [s for s, _ in spans]
    out = []
    for level, addr, length, offset in pieces:
        end = addr + length
        i = max(bisect.bisect_right(starts, addr) - 1, 0)
        while i < len(spans) and spans[i][0] < end:
            lo, hi = max(spans[i][0], addr), min(spans[i][1], end)
            if lo < hi:
                out.append((level, lo, hi - lo, offset + (lo - addr)))
            i += 1
    return out


class PageWriter:
    """Pages files of every pass, mapped once, written into replica tasks."""

    def __init__(self):
        self._maps = {}

    def _source(self, path):
        if path not in self._maps:
            self._maps[path] = map_pages_file(path)
        return self._maps[path]

    def _write(self, real, runs, src, offset):
        try:
            with phase("page fill"):
                written = core.vm_write_runs(real, runs, src, offset)
        except OSError as exc:
            raise RestoreError(f"pid {real}: writing pages into the replica: {exc.strerror}") from None
        except ValueError as exc:
            raise RestoreError(f"pid {real}: {exc}") from None
        progress.advance(written)
        return written

    def write_delta(self, real, chain, owner):
        """The pages this pass saved for owner -> bytes written."""
        runs = delta_runs(chain, owner)
        if not runs:
            return 0
        return self._write(real, runs, self._source(chain.dir(0).pages_path(owner)), 0)

    def write_runs(self, real, runs, data):
        """Pages that arrive over the network: `data` holds the runs back to back -> bytes written."""
        return self._write(real, runs, data, 0)

    def write_resolved(self, real, chain, owner, ranges, skip_level0=True):
        """Every saved page of owner inside ranges, following in_parent runs up the chain."""
        if not ranges:
            return 0
        pieces = [p for p in chain.pieces(owner) if not (skip_level0 and p[0] == 0)]
        total = 0
        batch, level, start, next_off = array("Q"), None, 0, None
        for lvl, addr, length, offset in _clip(pieces, ranges) + [(None, 0, 0, 0)]:
            if batch and (lvl != level or offset != next_off):
                total += self._write(real, batch, self._source(chain.dir(level).pages_path(owner)), start)
                batch = array("Q")
            if lvl is None:
                break
            if not batch:
                level, start, next_off = lvl, offset, offset
            batch.extend((addr, length))
            next_off += length
        return total

    def zero_absent(self, remote, real, chain, owner, mm, previous=None):
        """Drop replica pages that the source did not have at this pass -> bytes dropped.

        previous: the coverage of the pass applied before, when the replica
        held exactly that (then only what left it since needs dropping and
        the replica's pagemap is not read); None reads the replica's pagemap
        (a task just forked, which holds whatever its parent had).
        """
        now = coverage(chain, owner)
        private = R.normalize(array("Q", [x for v in mm.vmas if not v.shared and str(v.kind) not in SPECIAL
                                          for x in (v.start, v.end - v.start)]))
        if previous is not None:
            extra = R.intersect(R.subtract(previous, now), private)
        else:
            have = array("Q")
            fd = proc.open_pagemap(real)
            try:
                for vma in mm.vmas:
                    if vma.shared or str(vma.kind) in SPECIAL:
                        continue
                    have.extend(core.pagemap_runs(fd, vma.start, vma.end, True, True, str(vma.kind) == "file"))
            finally:
                os.close(fd)
            extra = R.subtract(R.normalize(have), now)
        for start, end in R.pairs(extra):
            remote.check("madvise", start, end - start, MADV_DONTNEED, what=f"{start:#x}, DONTNEED")
        if extra:
            log.info("pid %d: dropped %d pages the source no longer has", remote.pid, R.total(extra) // PAGE)
        return R.total(extra)

    def close(self):
        for m in self._maps.values():
            if isinstance(m, mmap.mmap):
                m.close()
        self._maps.clear()
