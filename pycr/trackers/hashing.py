"""hash: a 64-bit hash per page, compared with the parent pass's hashes.

Works on any kernel and keeps nothing in the target; it costs a read and a
hash of all present memory every pass. A page goes to the parent only if the
parent chain holds it and its hash is unchanged, so a page rewritten with the
same bytes is not copied again. The bytes saved are exactly the bytes hashed
(one read), so a page written during a live pass is seen at the next one.
"""

import os
from array import array

from .. import proc, progress
from ..errors import TaskGone
from ..log import log
from ..native import core
from . import runs as R
from .base import PAGE, Tracker, present_pages

CHUNK = 32 << 20


class HashTracker(Tracker):
    name = "hash"

    def _parent_hashes(self, pid):
        """{vaddr: hash} of the pages the parent chain holds, or {}."""
        parent = self.parent_of(pid)
        state = parent.state(pid) if parent else None
        if state is None or state.tracker != self.name:
            if parent:
                log.warning("pid %d: no page hashes in %s: copying all its memory", pid, parent.imgdir.path)
            return {}
        runs, hashes = array("Q", state.hash_runs), array("Q", state.hashes)
        every, k = {}, 0
        for start, end in R.pairs(runs):
            for addr in range(start, end, PAGE):
                every[addr] = hashes[k]
                k += 1
        held = {}
        for start, end in R.pairs(parent.coverage(pid)):
            for addr in range(start, end, PAGE):
                if addr in every:
                    held[addr] = every[addr]
        return held

    def save_pages(self, pid, vmas, imgdir, live):
        present = present_pages(pid, vmas)
        old = self._parent_hashes(pid)
        save, in_parent, hashed, hashes = [], [], [], array("Q")
        written = 0
        try:
            mem = proc.open_mem(pid)
        except TaskGone:
            raise TaskGone(pid, "exited during the copy") from None
        try:
            with imgdir.pages_writer(str(pid)) as out:
                for piece, _ in R.split(present, CHUNK):
                    for addr, length in zip(piece[0::2], piece[1::2]):
                        try:
                            data = os.pread(mem, length, addr)
                        except OSError:
                            data = b""
                        if len(data) != length:
                            if not live:
                                raise TaskGone(pid, f"cannot read {addr:#x}")
                            continue        # unmapped meanwhile: the next pass sees it
                        progress.advance(length)        # every present page is read and hashed
                        page_hashes = core.hash_pages(data, length // PAGE)
                        hashed.append((addr, addr + length))
                        hashes.extend(page_hashes)
                        for k, h in enumerate(page_hashes):
                            va = addr + k * PAGE
                            if old.get(va) == h:
                                in_parent.append((va, va + PAGE))
                            else:
                                out.write(data[k * PAGE:(k + 1) * PAGE])
                                written += PAGE
                                save.append((va, va + PAGE))
        finally:
            os.close(mem)
        save, in_parent = R.from_pairs(save), R.from_pairs(in_parent)
        log.info("pid %d: %d pages changed, %d unchanged since the parent", pid,
                 R.total(save) // PAGE, R.total(in_parent) // PAGE)
        entries = [(save[i], save[i + 1] // PAGE, False) for i in range(0, len(save), 2)]
        entries += [(in_parent[i], in_parent[i + 1] // PAGE, True) for i in range(0, len(in_parent), 2)]
        entries.sort()
        imgdir.write("pagemap", {"owner": str(pid), "entries": entries}, str(pid))
        imgdir.write("tracker", self.state_record(pid, hash_runs=R.from_pairs(hashed).tobytes(),
                                                  hashes=hashes.tobytes()), pid)
        return written
