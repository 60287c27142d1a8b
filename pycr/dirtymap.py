"""`pycr show --dirty-map`: which pages of each process every pass of a chain saved.

A pre-dump chain (or the work directory of `pycr migrate -W`) holds one image
set per pass; each pass's pagemap lists the pages written since the previous
pass (the first pass: every present page) as runs outside the parent, and the
pages kept from earlier passes as in_parent runs. Laid out pass by pass, they
show a program's write pattern and why a migration converged or did not.

Shared memory (pages-shmem-<id>) is drawn in every VMA that maps it; a pass
saves a shared object's data pages whole, so they show in every pass.

This module only reads images: `load(path)` -> DirtyMap (runs per process per
pass, on an address axis compressed to the regions that hold saved pages),
`text(dmap)` for the terminal. Drawing is pycr/dirtymap_draw.py (matplotlib,
imported only when a picture is asked for).
"""

import os
from dataclasses import dataclass, field

from .errors import ImageError
from .images import ImageDir

#: processes drawn (and given ASCII strips) at most; the largest by pages saved
MAX_PROCESSES = 6
#: characters of an ASCII strip (gaps included)
STRIP_WIDTH = 64
#: regions listed by name under the strips (the largest)
MAX_REGIONS_LISTED = 8


@dataclass
class PassInfo:
    """One image set of the chain."""
    path: str
    name: str           # the directory's name (01-pre-dump, d3, ...)
    kind: str           # pre-dump or dump
    tracker: str


@dataclass
class Region:
    """A stretch of address space with saved pages, drawn without the gaps around it."""
    start: int
    end: int
    label: str          # the largest VMA's path, or [heap], [stack], anon, shmem
    column: int         # its first column (page) on the compressed axis


@dataclass
class ProcessMap:
    """One process across the chain. Runs are (start, end) addresses, ascending."""
    pid: int
    comm: str
    page_size: int
    regions: list = field(default_factory=list)
    written: list = field(default_factory=list)    # per pass: runs saved in that pass, None if absent
    kept: list = field(default_factory=list)       # per pass: runs present but kept from a parent
    outside: int = 0                                # saved pages outside every VMA (none in a sound image)

    @property
    def columns(self):
        """Pages on the compressed axis (every region, end to end)."""
        return sum((r.end - r.start) // self.page_size for r in self.regions)

    def pages(self, index, which="written"):
        runs = getattr(self, which)[index]
        return 0 if runs is None else sum(e - s for s, e in runs) // self.page_size

    def total(self):
        return sum(self.pages(i) for i in range(len(self.written)))

    def column_runs(self, index, which="written"):
        """The pass's runs as [c0, c1) column ranges on the compressed axis."""
        runs = getattr(self, which)[index] or []
        out, r = [], 0
        for start, end in runs:
            while r < len(self.regions) and self.regions[r].end <= start:
                r += 1
            i = r
            while i < len(self.regions) and self.regions[i].start < end:
                reg = self.regions[i]
                s, e = max(start, reg.start), min(end, reg.end)
                if s < e:
                    out.append((reg.column + (s - reg.start) // self.page_size,
                                reg.column + (e - reg.start) // self.page_size))
                i += 1
        return out

    def written_pages(self, index):
        """Every address the pass saved (for tests and small maps)."""
        return [a for s, e in (self.written[index] or []) for a in range(s, e, self.page_size)]


@dataclass
class DirtyMap:
    path: str
    passes: list            # PassInfo, first pass first
    processes: dict         # pid -> ProcessMap

    def largest(self, n=MAX_PROCESSES):
        """The n processes with the most pages saved over the chain, largest first."""
        return sorted(self.processes.values(), key=lambda p: (-p.total(), p.pid))[:n]


# ---------------------------------------------------------------- the chain

NOT_A_CHAIN = ("neither an image set nor a directory of pass sets (a pre-dump chain's last "
               "directory, or the work directory of `pycr migrate -W DIR`)")


def _is_set(path):
    return os.path.isfile(os.path.join(path, "inventory.img"))


def _parent_path(path):
    inventory = ImageDir(path).read("inventory")
    if not inventory.parent:
        return None
    return os.path.normpath(os.path.join(path, inventory.parent))


def find_chain(path):
    """The image sets of the chain that path names, first pass first.

    path is the last set of a chain (its parents are followed back to the
    first), or a directory holding the sets of exactly one chain (found by
    their parent links, whatever their names)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ImageError(path, "no such directory" if not os.path.exists(path) else "not a directory")
    if _is_set(path):
        return _walk_back(path)
    try:
        subdirs = [os.path.join(path, n) for n in sorted(os.listdir(path))]
    except OSError as exc:
        raise ImageError(path, f"cannot list it: {exc.strerror}") from None
    sets = [d for d in subdirs if os.path.isdir(d) and _is_set(d)]
    if not sets:
        raise ImageError(path, NOT_A_CHAIN)
    real = {os.path.realpath(d): d for d in sets}
    children = {}
    for d in sets:
        parent = _parent_path(d)
        key = os.path.realpath(parent) if parent else None
        children.setdefault(key, []).append(d)
    last = [d for d in sets if os.path.realpath(d) not in children]
    if len(last) != 1:
        names = ", ".join(os.path.basename(d) for d in last)
        raise ImageError(path, f"holds {len(last)} chains (last sets {names}): name the last set of one")
    chain = _walk_back(last[0])
    if len(chain) < len(sets):
        inside = {os.path.realpath(d) for d in chain}
        stray = [os.path.basename(d) for r, d in real.items() if r not in inside]
        raise ImageError(path, f"holds image sets outside the chain ending at {os.path.basename(last[0])}: "
                               f"{', '.join(stray)}; name the last set of the chain to draw")
    return chain


def _walk_back(last):
    chain, seen, here = [], set(), last
    while here is not None:
        if not _is_set(here):
            raise ImageError(here, f"missing: the parent named by {chain[-1]}'s inventory is not an image set")
        real = os.path.realpath(here)
        if real in seen:
            raise ImageError(here, "the chain loops back to this set")
        seen.add(real)
        chain.append(here)
        here = _parent_path(here)
    return chain[::-1]


# ---------------------------------------------------------------- extraction

def load(path):
    """DirtyMap of the chain that path names (see find_chain)."""
    chain = find_chain(path)
    passes, per_pass = [], []
    page_size = None
    for set_path in chain:
        imgdir = ImageDir(set_path)
        inventory = imgdir.read("inventory")
        if page_size is None:
            page_size = inventory.page_size
        elif inventory.page_size != page_size:
            raise ImageError(set_path, f"page size {inventory.page_size} differs from the chain's {page_size}")
        passes.append(PassInfo(set_path, os.path.basename(os.path.normpath(set_path)),
                               str(inventory.kind), inventory.tracker))
        per_pass.append(_read_pass(imgdir, page_size))
    processes = {}
    for pid in sorted({pid for seen in per_pass for pid in seen}):
        processes[pid] = _process(pid, per_pass, page_size)
    return DirtyMap(os.fspath(path), passes, processes)


def _read_pass(imgdir, page_size):
    """{pid: (comm, vmas, written runs, kept runs)} of one set, shared memory placed in its VMAs."""
    pids, shmem = [], {}
    for image in imgdir.list():
        if image.kind != "pagemap":
            continue
        if isinstance(image.key, int):
            pids.append(image.key)
        elif str(image.key).startswith("shmem-") and str(image.key)[6:].isdigit():
            shmem[int(str(image.key)[6:])] = _runs(imgdir.read("pagemap", image.key), page_size)
    out = {}
    for pid in pids:
        written, kept = _runs(imgdir.read("pagemap", pid), page_size)
        mm_vmas = imgdir.read("mm", pid).vmas if imgdir.exists("mm", pid) else []
        comm = imgdir.read("core", pid).comm if imgdir.exists("core", pid) else "?"
        for v in mm_vmas:
            if (str(v.kind) == "shmem" or v.path.startswith("/memfd:")) and v.shmem_id in shmem:
                w, k = shmem[v.shmem_id]
                written = _merge(written + _place(w, v))
                kept = _merge(kept + _place(k, v))
        vmas = [(v.start, v.end, _vma_label(v)) for v in mm_vmas if str(v.kind) not in _SPECIAL]
        out[pid] = (comm, vmas, written, kept)
    return out


_SPECIAL = ("vdso", "vvar", "vvar_vclock", "vsyscall")


def _vma_label(vma):
    kind = str(vma.kind)
    if kind in ("heap", "stack"):
        return f"[{kind}]"
    if kind == "shmem" and vma.path.startswith("/dev/zero"):
        return "shared anon"
    if vma.path:
        return os.path.basename(vma.path) if vma.path.startswith("/") else vma.path
    return "shmem" if kind == "shmem" else "anon"


def _runs(pagemap, page_size):
    """(written, kept) (start, end) runs of a pagemap, merged."""
    written, kept = [], []
    for e in pagemap.entries:
        (kept if e.in_parent else written).append((e.vaddr, e.vaddr + e.nr_pages * page_size))
    return _merge(written), _merge(kept)


def _place(runs, vma):
    """Offsets of a shared object's runs as addresses of one VMA that maps it."""
    lo, hi = vma.pgoff, vma.pgoff + (vma.end - vma.start)
    return [(vma.start + max(s, lo) - lo, vma.start + min(e, hi) - lo) for s, e in runs if s < hi and e > lo]


def _merge(runs):
    """Sorted (start, end) runs with overlapping and touching ones joined."""
    out = []
    for s, e in sorted(runs):
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def _overlaps(runs, start, end):
    return any(s < end and start < e for s, e in runs)


def _process(pid, per_pass, page_size):
    """ProcessMap of pid: its regions are the VMAs (of any pass) that hold a saved page,
    joined where they touch; runs outside them are counted, not drawn."""
    pm = ProcessMap(pid, "?", page_size)
    saved, vmas = [], []
    for seen in per_pass:
        if pid not in seen:
            pm.written.append(None)
            pm.kept.append(None)
            continue
        comm, pass_vmas, written, kept = seen[pid]
        pm.comm = comm
        pm.written.append(written)
        pm.kept.append(kept)
        saved += written + kept
        vmas += pass_vmas
    saved = _merge(saved)
    used = [v for v in vmas if _overlaps(saved, v[0], v[1])]
    spans = _merge([(s, e) for s, e, _ in used])
    column = 0
    for s, e in spans:
        inside = [v for v in used if v[0] < e and s < v[1]]
        label = max(inside, key=lambda v: v[1] - v[0])[2]
        pm.regions.append(Region(s, e, label, column))
        column += (e - s) // page_size
    covered = sum(min(e, r.end) - max(s, r.start) for s, e in saved for r in pm.regions
                  if s < r.end and r.start < e)
    pm.outside = (sum(e - s for s, e in saved) - covered) // page_size
    return pm


# ---------------------------------------------------------------- text

def bins(column_runs, columns, width):
    """Fraction of each of `width` equal bins of [0, columns) the runs cover."""
    out = [0.0] * width
    if columns <= 0:
        return out
    scale = width / columns
    for c0, c1 in column_runs:
        a, b = c0 * scale, c1 * scale
        i = int(a)
        while i < width and i < b:
            out[i] += min(b, i + 1) - max(a, i)
            i += 1
    return [min(x, 1.0) for x in out]


_SHADES = " .:-=+*#"


def strip(pm, index, width=STRIP_WIDTH):
    """One pass of a process as characters: '#' a fully written stretch, ' ' none, '|' a cut gap."""
    if pm.written[index] is None:
        return "(not in this pass)"
    columns = pm.columns
    gaps = len(pm.regions) - 1
    # Every region gets one character, the rest go in proportion to its pages.
    spare = max(width - gaps - len(pm.regions), 0)
    sizes = [(r.end - r.start) // pm.page_size for r in pm.regions]
    widths = [1 + (round(spare * n / columns) if columns else 0) for n in sizes]
    runs = pm.column_runs(index)
    parts = []
    for reg, n, w in zip(pm.regions, sizes, widths):
        local = [(max(c0, reg.column) - reg.column, min(c1, reg.column + n) - reg.column)
                 for c0, c1 in runs if c0 < reg.column + n and c1 > reg.column]
        parts.append("".join(_shade(f) for f in bins(local, n, w)))
    return "|".join(parts)


def _shade(fraction):
    if fraction <= 0:
        return " "
    return _SHADES[max(1, min(len(_SHADES) - 1, round(fraction * (len(_SHADES) - 1))))]


def text(dmap, width=STRIP_WIDTH):
    """The map for a terminal: pages saved per pass per process, and ASCII strips of the largest."""
    passes = dmap.passes
    lines = [f"{dmap.path}: {len(passes)} passes, {len(dmap.processes)} processes"]
    for i, p in enumerate(passes):
        lines.append(f"  pass {i + 1}: {p.name} ({p.kind}{', ' + p.tracker if p.tracker else ''})")
    drawn = dmap.largest()
    for pm in drawn:
        size = _size(pm.columns * pm.page_size)
        lines.append("")
        lines.append(f"pid {pm.pid} ({pm.comm}): {len(pm.regions)} regions with saved pages, {size} "
                     "(gaps between them cut out, '|')")
        label_width = len(str(len(passes)))
        for i in range(len(passes)):
            count = "-" if pm.written[i] is None else str(pm.pages(i))
            lines.append(f"  pass {i + 1:>{label_width}} {count:>8} pages  |{strip(pm, i, width)}|")
        lines.append("  regions, in address order:")
        listed = sorted(sorted(pm.regions, key=lambda r: r.start - r.end)[:MAX_REGIONS_LISTED],
                        key=lambda r: r.start)
        lines += [f"    {r.start:#014x}-{r.end:#014x} {_size(r.end - r.start):>10}  {r.label}" for r in listed]
        if len(pm.regions) > len(listed):
            lines.append(f"    ... and {len(pm.regions) - len(listed)} smaller ones")
        if pm.outside:
            lines.append(f"  ({pm.outside} saved pages lie outside every VMA: not drawn)")
    rest = sorted(set(dmap.processes) - {pm.pid for pm in drawn})
    if rest:
        lines.append("")
        lines.append(f"{len(rest)} smaller processes (pages saved per pass):")
        for pid in rest:
            pm = dmap.processes[pid]
            counts = " ".join("-" if pm.written[i] is None else str(pm.pages(i)) for i in range(len(passes)))
            lines.append(f"  pid {pid} ({pm.comm}): {counts}")
    return "\n".join(lines) + "\n"


def _size(nbytes):
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:g} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
