"""pagemap-<owner>.img: which pages of an address space were saved, and where.

Entries are runs of consecutive pages. A run with in_parent set lives in the
parent image directory (see inventory.parent); every other run occupies the
next nr_pages pages of pages-<owner>.img, in entry order.

A pagemap can hold a million runs, so the entry array is packed with the
struct module instead of one construct Struct per entry (same bytes, ~100x
faster); entries come back as PageRun tuples.
"""

import array
import struct
import sys
from collections import namedtuple

from construct import Construct, SizeofError, ValidationError, Struct
from construct.core import stream_read, stream_write

from .common import String

MAGIC = b"PYCP"
FILE_NAME = "pagemap-{owner}.img"

#: flags bit: the run's pages are in the parent image set, not in pages-<owner>.
FLAG_IN_PARENT = 1

_COUNT = struct.Struct("<I")
_ENTRY = struct.Struct("<QII")      # vaddr u64, nr_pages u32, flags u32
ENTRY_SIZE = _ENTRY.size

PageRun = namedtuple("PageRun", "vaddr nr_pages in_parent")
PageRun.__doc__ = "A run of nr_pages pages starting at vaddr."


def _as_fields(entry):
    """(vaddr, nr_pages, flags) from a PageRun, a tuple or a mapping (JSON)."""
    if isinstance(entry, dict):
        return entry["vaddr"], entry["nr_pages"], FLAG_IN_PARENT if entry["in_parent"] else 0
    vaddr, nr_pages, in_parent = entry
    return vaddr, nr_pages, FLAG_IN_PARENT if in_parent else 0


class PageRuns(Construct):
    """u32 count, then count x (vaddr u64, nr_pages u32, flags u32)."""

    def _parse(self, stream, context, path):
        (count,) = _COUNT.unpack(stream_read(stream, _COUNT.size, path))
        raw = stream_read(stream, count * ENTRY_SIZE, path)
        words = array.array("I")
        words.frombytes(raw)
        if sys.byteorder != "little":
            words.byteswap()
        flags = words[3::4]                 # the flags word of every entry
        if flags and max(flags) > FLAG_IN_PARENT:
            bad = next(i for i, f in enumerate(flags) if f > FLAG_IN_PARENT)
            vaddr = _ENTRY.unpack_from(raw, bad * ENTRY_SIZE)[0]
            raise ValidationError(f"pagemap run at {vaddr:#x}: unknown flags {flags[bad]:#x}", path=path)
        new = tuple.__new__                 # skips namedtuple's argument parsing
        return [new(PageRun, (vaddr, nr_pages, flag == FLAG_IN_PARENT))
                for vaddr, nr_pages, flag in _ENTRY.iter_unpack(raw)]

    def _build(self, obj, stream, context, path):
        pack = _ENTRY.pack
        try:
            body = b"".join(pack(*_as_fields(e)) for e in obj)
        except (struct.error, KeyError, TypeError, ValueError) as exc:
            raise ValidationError(f"bad pagemap entry: {exc}", path=path) from None
        stream_write(stream, _COUNT.pack(len(body) // ENTRY_SIZE), _COUNT.size, path)
        stream_write(stream, body, len(body), path)
        return obj

    def _sizeof(self, context, path):
        raise SizeofError("pagemap entries have a variable count", path=path)


Body = Struct(
    "owner" / String,           # a pid ("1234") or "shmem-<id>"
    "entries" / PageRuns(),     # ascending vaddr (an offset for shmem owners)
)
