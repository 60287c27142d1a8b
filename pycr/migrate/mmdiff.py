"""How one replica address space must change to match the next pass.

The replica's side is what is really mapped (/proc/PID/maps of the replica
task), the wanted side is the pass's mm image. Memory survives where both map
the same backing at the same address: private anonymous memory, the same file
at the same file offset, the same shared object (for memfds, shared memory,
SysV segments and deleted files: the one pycr made for them). There nothing is remapped and
the pages already in the replica stay (the pass's pagemap marks them
in_parent when they did not change). Everything else is planned:

- unmap: replica ranges that no VMA of the image covers;
- map:   parts of image VMAs not covered by the same backing (new, moved,
         grown, or another backing at that address: mmap MAP_FIXED replaces it);
- protect: shared mappings kept whose protection changed. Private mappings
  stay writable until the final pass (pages are written into them), which
  sets every protection at once.

Comparing address ranges instead of VMA records makes splits, merges and
resizes fall out by themselves.
"""

import bisect
import os
from array import array
from dataclasses import dataclass, field

from pycr.abi import PROT_EXEC, PROT_READ, PROT_WRITE
from pycr.restore import ghost
from pycr.trackers import runs as R

SPECIAL = ("vdso", "vvar", "vvar_vclock", "vsyscall")
DELETED = " (deleted)"


def _strip(path):
    return path[: -len(DELETED)] if path.endswith(DELETED) else path


def made_key(vma):
    """The key of the object pycr makes for an image VMA in the restorer's shmem_paths
    (a memfd, shared memory, a SysV segment, a deleted file), or None: the file itself."""
    if str(vma.kind) == "shmem" or vma.path.startswith("/memfd:"):
        return vma.shmem_id
    if ghost.is_ghost_vma(vma):
        return ghost.vma_key(vma)
    return None


def made_backings(shmem_paths):
    """key -> (path, inode) of each object pycr made, as the replica's maps show it.
    shmem_paths is the restorer's: a path pycr's fd opens, or ("sysv", id, size) for a
    SysV segment (whose inode number in maps is its id)."""
    out = {}
    for key, target in shmem_paths.items():
        if isinstance(target, tuple):
            out[key] = ("", target[1])
        else:
            out[key] = (_strip(os.readlink(target)), os.stat(target).st_ino)
    return out


def image_backing(vma, made):
    """What backs an image VMA, comparable with live_backing(); made: made_backings()."""
    kind = str(vma.kind)
    ours = made.get(made_key(vma))
    if kind == "shmem":
        return ("shmem", ours[1] if ours else -1)
    if kind == "file":
        path, inode = ours if ours else (_strip(vma.path), vma.inode)
        return ("file", bool(vma.shared), path, inode, vma.pgoff - vma.start)
    return ("anon", bool(vma.shared))


def live_backing(vma):
    """What backs a VMA of /proc/PID/maps (pycr.proc.maps.Vma)."""
    if vma.kind == "shmem":
        return ("shmem", vma.inode)
    if vma.kind == "file":
        return ("file", vma.shared, vma.path, vma.inode, vma.offset - vma.start)
    return ("anon", vma.shared)


def live_prot(vma):
    return (PROT_READ if vma.read else 0) | (PROT_WRITE if vma.write else 0) | (PROT_EXEC if vma.exec else 0)


@dataclass
class LayoutPlan:
    unmap: array = field(default_factory=lambda: array("Q"))   # runs (start, len)
    map: list = field(default_factory=list)                     # (image vma, start, end)
    protect: list = field(default_factory=list)                 # (start, end, prot)

    @property
    def fresh(self):
        """Runs of every part mapped anew (its pages must all be written)."""
        return R.normalize(array("Q", [x for _, s, e in self.map for x in (s, e - s)]))

    @property
    def empty(self):
        return not self.unmap and not self.map and not self.protect


def plan(live, image_vmas, made):
    """LayoutPlan from the replica's live VMAs to the image's (specials left out of both);
    made: made_backings() of the objects pycr made for this pass."""
    live = sorted((v for v in live if v.kind not in SPECIAL), key=lambda v: v.start)
    want = [v for v in image_vmas if str(v.kind) not in SPECIAL]
    out = LayoutPlan()
    out.unmap = R.subtract(R.from_pairs((v.start, v.end) for v in live),
                           R.normalize(array("Q", [x for v in want for x in (v.start, v.end - v.start)])))
    starts = [v.start for v in live]
    for w in want:
        backing = image_backing(w, made)
        kept = []
        i = max(bisect.bisect_right(starts, w.start) - 1, 0)
        while i < len(live) and live[i].start < w.end:
            v = live[i]
            lo, hi = max(v.start, w.start), min(v.end, w.end)
            if lo < hi and live_backing(v) == backing:
                kept.append((lo, hi))
                if w.shared and live_prot(v) != w.prot:
                    out.protect.append((lo, hi, w.prot))
            i += 1
        fresh = R.subtract(array("Q", (w.start, w.end - w.start)), R.from_pairs(kept))
        out.map.extend((w, s, e) for s, e in R.pairs(fresh))
    return out
