"""soft-dirty: clear_refs 4, then pagemap bit 55 marks pages written since.

Needs CONFIG_MEM_SOFT_DIRTY; where the kernel lacks it, choosing this tracker
fails at once with KernelFeatureMissing (pycr check says the same). The kernel
marks new VMAs and a new mm (exec) soft-dirty by itself, so no VMA diffing is
needed. clear_refs acts on the whole process and is written while frozen.
"""

import os
from array import array

from .. import proc
from ..abi import PM_SOFT_DIRTY
from ..check import check_soft_dirty
from ..errors import KernelFeatureMissing, from_oserror
from ..native import core
from . import runs as R
from .base import Tracker, plan_copy, present_pages, write_pages


def soft_dirty_runs(pid, spans):
    """Runs of pages of pid whose pagemap entry has the soft-dirty bit."""
    found = array("Q")
    fd = proc.open_pagemap(pid)
    try:
        for start, end in spans:
            try:
                found.extend(core.pagemap_match(fd, start, end, PM_SOFT_DIRTY))
            except OSError as exc:
                raise from_oserror(exc, pid, "pagemap") from None
    finally:
        os.close(fd)
    return R.normalize(found)


class SoftDirtyTracker(Tracker):
    name = "soft-dirty"

    def __init__(self, parent=None):
        finding = check_soft_dirty()
        if not finding.ok:
            raise KernelFeatureMissing("soft-dirty tracking", finding.detail)
        super().__init__(parent)
        self.dirty = {}
        self.spans = {}
        self.final = False

    def while_frozen(self, pid, leader, final):
        super().while_frozen(pid, leader, final)
        parent = self.parent_of(pid)
        state = parent.state(pid) if parent else None
        self.final = final
        if state is not None and state.tracker == self.name:
            self.spans[pid] = [(vma.start, vma.end) for vma, *_ in self.layout(pid).mapped]
            self.dirty[pid] = soft_dirty_runs(pid, self.spans[pid])
        else:
            self.dirty[pid] = None
        if not final:
            proc.clear_refs(pid, "4")

    def save_pages(self, pid, vmas, imgdir, live):
        if self.final and self.dirty.get(pid) is not None:
            # Read the bits again just before copying: pycr's own injected syscalls,
            # on their return to user mode, let the kernel write the task's rseq area.
            self.dirty[pid] = soft_dirty_runs(pid, self.spans[pid])
        present = present_pages(pid, vmas)
        save, in_parent = plan_copy(present, self.dirty.get(pid), self.coverage(pid))
        written = write_pages(pid, vmas, imgdir, save, in_parent, live)
        imgdir.write("tracker", self.state_record(pid), pid)
        return written


