"""Set operations on page runs: array('Q') of alternating start, length.

Runs are sorted, page aligned and do not overlap. Dirty sets, present pages
and what a parent image covers are all kept this way, one pair per run, so a
1 GiB process costs a few thousand integers, not 262144 page objects.
"""

from array import array


def pairs(runs):
    """(start, end) tuples of runs."""
    return [(runs[i], runs[i] + runs[i + 1]) for i in range(0, len(runs), 2)]


def from_pairs(spans):
    """Runs from (start, end) tuples sorted by start; touching or overlapping ones merge."""
    out = array("Q")
    for start, end in spans:
        if end <= start:
            continue
        if out and out[-2] + out[-1] >= start:
            out[-1] = max(out[-2] + out[-1], end) - out[-2]
        else:
            out.extend((start, end - start))
    return out


def normalize(runs):
    """Sorted, merged runs from runs in any order."""
    return from_pairs(sorted(pairs(runs)))


def union(a, b):
    return from_pairs(sorted(pairs(a) + pairs(b)))


def intersect(a, b):
    """Pages in both a and b."""
    pa, pb = pairs(a), pairs(b)
    out, i, j = [], 0, 0
    while i < len(pa) and j < len(pb):
        start = max(pa[i][0], pb[j][0])
        end = min(pa[i][1], pb[j][1])
        if start < end:
            out.append((start, end))
        if pa[i][1] < pb[j][1]:
            i += 1
        else:
            j += 1
    return from_pairs(out)


def subtract(a, b):
    """Pages of a that are not in b."""
    pb = pairs(b)
    out, j = [], 0
    for start, end in pairs(a):
        while j < len(pb) and pb[j][1] <= start:
            j += 1
        k, pos = j, start
        while k < len(pb) and pb[k][0] < end:
            if pb[k][0] > pos:
                out.append((pos, pb[k][0]))
            pos = max(pos, pb[k][1])
            k += 1
        if pos < end:
            out.append((pos, end))
    return from_pairs(out)


def total(runs):
    """Bytes covered by runs."""
    return sum(runs[1::2])


def covers(runs, start, end):
    """True if [start, end) lies wholly inside runs."""
    return total(intersect(runs, array("Q", (start, end - start)))) == end - start


def ramp(first, largest):
    """Piece sizes for split: first, twice that, ... up to largest, then largest on. A copy
    that reports progress after each piece shows it soon on a small step, while a large step
    is still copied in large pieces (each call, or each injected syscall, has a fixed cost)."""
    size = first
    while size < largest:
        yield size
        size *= 2
    while True:
        yield largest


def split(runs, limit, count=None):
    """(runs, bytes) pieces of `runs`, in order, each at most `limit` bytes and `count` runs
    (a run longer than that is cut), for copies done a bounded buffer (or iovec array) at a time.
    limit may also be an iterator of sizes (ramp), one per piece."""
    limits = None if isinstance(limit, int) else iter(limit)
    if limits is not None:
        limit = next(limits)
    piece, size = array("Q"), 0
    for i in range(0, len(runs), 2):
        addr, length = runs[i], runs[i + 1]
        while length:
            take = min(length, limit - size)
            piece.extend((addr, take))
            size += take
            addr += take
            length -= take
            if size == limit or (count is not None and len(piece) == 2 * count):
                yield piece, size
                piece, size = array("Q"), 0
                if limits is not None:
                    limit = next(limits)
    if size:
        yield piece, size
