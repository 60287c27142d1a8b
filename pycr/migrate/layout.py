"""Reshaping the address space of a stopped replica task to a pass's mm image.

Every change is an injected syscall through pycr's workspace (trampoline +
scratch) in the task. The workspace is moved first if the image now has a
VMA over it: it is never unmapped while the task still needs pycr. The order
is that of the first restore (pycr.restore.mm): unmap what went away, move
[vvar]/[vdso] (they move only with an exec), map what is new, re-protect.
"""

import bisect
from array import array

from construct import Container

from pycr import proc
from pycr.log import log
from pycr.restore import mm as restore_mm
from pycr.migrate import mmdiff
from pycr.trackers import runs as R

WORKSPACE_SIZE = restore_mm.WORKSPACE_SIZE


def _overlaps(start, end, ws):
    return start < ws + WORKSPACE_SIZE and ws < end


def live_vmas(task):
    """The task's VMAs as the kernel has them, pycr's workspace left out."""
    return [v for v in proc.maps(task.real) if not _overlaps(v.start, v.end, task.workspace)]


def clear_workspace(task, image_vmas):
    """Move pycr's workspace if a VMA of the image lies over it."""
    old = task.workspace
    if not any(_overlaps(v.start, v.end, old) for v in image_vmas):
        return False
    r = task.remote
    # Holes of the image that are also free now (MAP_FIXED_NOREPLACE checks the latter).
    new = restore_mm.map_workspace(r, list(image_vmas))
    r.check("munmap", old, WORKSPACE_SIZE, what=f"{old:#x}, old workspace")
    task.workspace = new
    log.info("pid %d: moved pycr's workspace from %#x to %#x (the image maps %#x)", task.pid, old, new, old)
    return True


def _part(vma, start, end):
    """A copy of an image VMA record cut to [start, end)."""
    part = Container(vma)
    part.start, part.end = start, end
    if str(vma.kind) in ("file", "shmem"):
        part.pgoff = vma.pgoff + (start - vma.start)
    return part


def apply(task, mm_img, shmem_paths, made):
    """Make the task's layout that of mm_img -> runs mapped anew (their pages all go in).

    shmem_paths: the restorer's shared objects (as map_vmas takes them); made: their
    mmdiff.made_backings()."""
    r = task.remote
    clear_workspace(task, mm_img.vmas)
    plan = mmdiff.plan(live_vmas(task), mm_img.vmas, made)
    for start, end in R.pairs(plan.unmap):
        r.check("munmap", start, end - start, what=f"{start:#x}, {end - start:#x}")
    restore_mm.place_specials(r, mm_img.vmas)
    if plan.map:
        parts = Container(vmas=[_part(v, s, e) for v, s, e in plan.map])
        restore_mm.map_vmas(r, parts, shmem_paths)
    for start, end, prot in plan.protect:
        r.check("mprotect", start, end - start, prot, what=f"{start:#x}, shared")
    fresh = plan.fresh
    if not plan.empty:
        log.info("pid %d: layout: %d ranges unmapped, %d mapped, %d re-protected", task.pid,
                 len(plan.unmap) // 2, len(plan.map), len(plan.protect))
    rejoined = rejoin_split(task, mm_img, shmem_paths)
    if rejoined:
        fresh = R.union(fresh, rejoined)
    r.reset_scratch()
    return fresh


def rejoin_split(task, mm_img, shmem_paths):
    """Map anew every image VMA that the replica holds as several VMAs -> their runs.

    Parts kept from different earlier mappings have different anon_vmas, and
    the kernel never merges those, while the source has one VMA there; a later
    mremap of it would fail in the replica (it must not span VMAs). Mapping
    the whole range again gives one VMA; its pages are then written whole.
    """
    live = live_vmas(task)
    starts = [v.start for v in live]
    split = []
    for vma in mm_img.vmas:
        if str(vma.kind) in mmdiff.SPECIAL:
            continue
        i = max(bisect.bisect_right(starts, vma.start) - 1, 0)
        inside = 0
        while i < len(live) and live[i].start < vma.end:
            if live[i].end > vma.start:
                inside += 1
            i += 1
        if inside > 1:
            split.append(vma)
    if not split:
        return None
    restore_mm.map_vmas(task.remote, Container(vmas=split), shmem_paths)
    log.info("pid %d: %d VMAs mapped anew to be one VMA each, as on the source", task.pid, len(split))
    return R.normalize(array("Q", [x for v in split for x in (v.start, v.end - v.start)]))


def finish(task, mm_img):
    """Final protections (private mappings were kept writable), madvise flags and mlock."""
    r = task.remote
    live = live_vmas(task)
    for vma in mm_img.vmas:
        if str(vma.kind) in mmdiff.SPECIAL:
            continue
        if any(v.start < vma.end and vma.start < v.end and mmdiff.live_prot(v) != vma.prot for v in live):
            r.check("mprotect", vma.start, vma.end - vma.start, vma.prot, what=f"{vma.start:#x}")
        size = vma.end - vma.start
        flags = vma.vmflags.split()
        for flag in flags:
            advice = restore_mm.MADVISE.get(flag)
            if advice is not None:
                r.call("madvise", vma.start, size, advice)
        if "lo" in flags:
            r.call("mlock2", vma.start, size, 0)
