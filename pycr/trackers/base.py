"""The dirty-page tracker interface, and what every tracker shares.

A pass of a chain (pre-dump, or the final dump with --prev-images-dir) saves
only the pages written since its parent pass; every other present page is
marked in_parent. Correctness rests on one rule, kept here and not in each
tracker: a page is marked in_parent only if the parent chain holds it
(its pagemap lists it) and the tracker vouches it was not written since the
parent copied it. Anything else present is copied again.

Pass order (predump drives it):
  while_frozen(pid, leader, final)  for each process, tree frozen: take the
                                    dirty set, re-arm tracking
  hidden_fds(pid)                   fds of pycr's own the files image must skip
  save_pages(pid, vmas, imgdir, live)  copy; live=True once the tree runs again
  finish()                          release pycr's side (the tracker may keep
                                    state in the target for the next pass)
  abort(leaders)                    on failure while frozen: undo what this
                                    pass changed in the targets ({pid: Thread})
"""

import errno
import os
from array import array

from .. import proc
from ..collect.mm import Layout
from ..collect.memory import copy_runs, present_runs, private_vmas, runs_to_entries
from ..errors import ImageError, TaskGone
from ..native.core import Copier
from ..log import Progress, log
from . import runs as R
from ..sysinfo import page_size

PAGE = page_size()


class ParentPass:
    """The previous pass of a chain: which pages it holds, and its tracker state."""

    def __init__(self, imgdir):
        self.imgdir = imgdir
        self.inventory = imgdir.read("inventory")
        self.start_times = {p.pid: p.start_time for p in imgdir.read("pstree").processes}

    def knows(self, pid, start_time):
        """True if the parent pass dumped this very process (not a reused PID)."""
        return self.start_times.get(pid) == start_time

    def coverage(self, pid):
        """Runs of every page of pid the chain holds (in this dir or further up)."""
        if not self.imgdir.exists("pagemap", str(pid)):
            return array("Q")
        entries = self.imgdir.read("pagemap", str(pid)).entries
        return R.from_pairs((e.vaddr, e.vaddr + e.nr_pages * PAGE) for e in entries)

    def state(self, pid):
        """The parent's tracker-<pid>.img, or None."""
        if not self.imgdir.exists("tracker", pid):
            return None
        return self.imgdir.read("tracker", pid)


class Tracker:
    """One dirty-page tracking method over a whole tree, for one pass."""

    name = ""

    def __init__(self, parent=None):
        self.parent = parent          # ParentPass or None (first pass)
        self.start_times = {}
        self.layouts = {}

    # --- interface
    def while_frozen(self, pid, leader, final):
        self.start_times[pid] = proc.stat(pid).start_time

    def layout(self, pid):
        """The collect.mm.Layout of a frozen process, made once per pass: its maps are read at
        the first call (before pycr injects anything), its smaps walk started by the caller."""
        got = self.layouts.get(pid)
        if got is None:
            got = self.layouts[pid] = Layout(pid)
        return got

    def hidden_fds(self, pid):
        return set()

    def save_pages(self, pid, vmas, imgdir, live):
        raise NotImplementedError

    def finish(self):
        pass

    def abort(self, leaders):
        pass

    # --- shared helpers
    def parent_of(self, pid):
        """The ParentPass if it dumped this same process, else None."""
        if self.parent and self.parent.knows(pid, self.start_times.get(pid)):
            return self.parent
        return None

    def coverage(self, pid):
        parent = self.parent_of(pid)
        return parent.coverage(pid) if parent else array("Q")

    def state_record(self, pid, **fields):
        rec = {"pid": pid, "tracker": self.name, "start_time": self.start_times.get(pid, 0),
               "uffd_fd": -1, "registered": b"", "hash_runs": b"", "hashes": b""}
        rec.update(fields)
        return rec


def plan_copy(present, dirty, coverage):
    """(save, in_parent): the present pages to copy, and those left to the parent.

    Copied: present pages reported dirty, and present pages the parent chain
    does not hold. dirty None means "everything" (tracking lost or new).
    """
    if dirty is None:
        return present, array("Q")
    save = R.union(R.intersect(present, dirty), R.subtract(present, coverage))
    return save, R.subtract(present, save)


def copy_live(pid, save, vmas, out, progress=None):
    """Copy runs from a running task to a pages writer; -> (bytes, runs actually copied).

    The task may unmap or re-protect memory meanwhile. A batch that faults is
    rolled back (file and checksums) and copied run by run through
    /proc/PID/mem (which reads through any protection); runs that are gone
    are left out: they are then in neither this image nor the parent's, and
    the next pass sees them.
    """
    start = out.tell()
    mark = out.sums.mark()
    try:
        return copy_runs(pid, save, vmas, out, progress), save
    except OSError as exc:
        if exc.errno not in (errno.EFAULT, errno.EIO, errno.ENOMEM):
            raise
    out.truncate(start)
    out.sums.rewind(mark)
    copied, total = array("Q"), 0
    try:
        mem = proc.open_mem(pid)
    except TaskGone:
        raise TaskGone(pid, "exited during the copy") from None
    try:
        for i in range(0, len(save), 2):
            addr, length = save[i], save[i + 1]
            try:
                data = os.pread(mem, length, addr)
            except OSError:
                data = b""
            if len(data) != length:
                log.info("pid %d: %#x-%#x went away during the copy", pid, addr, addr + length)
                continue
            out.write_fd(data)
            total += length
            if progress:
                progress.advance(length)
            copied.extend((addr, length))
    finally:
        os.close(mem)
    return total, copied


def write_pages(pid, vmas, imgdir, save, in_parent, live):
    """pages-<pid>.img with the save runs, pagemap-<pid>.img with both. Returns bytes."""
    mine = private_vmas(vmas)
    log.info("pid %d: copying %d pages in %d runs, %d pages left in the parent", pid,
             R.total(save) // PAGE, len(save) // 2, R.total(in_parent) // PAGE)
    if Copier.current() is not None:
        Copier.current().expect(R.total(save))      # a final pass's few MiB need no 32 MiB buffer
    with Progress(f"pid {pid} memory", R.total(save)) as progress, \
            imgdir.pages_writer(str(pid), R.total(save)) as f:
        if live:
            written, save = copy_live(pid, save, mine, f, progress)
        else:
            written = copy_runs(pid, save, mine, f, progress)
    entries = runs_to_entries(save) + runs_to_entries(in_parent, in_parent=True)
    entries.sort()
    imgdir.write("pagemap", {"owner": str(pid), "entries": entries}, str(pid))
    return written


def present_pages(pid, vmas):
    """Runs of the pages of pid worth saving (private memory, present or swapped)."""
    return present_runs(pid, private_vmas(vmas))


def check_parent_tree(parent, root):
    """ImageError unless the parent pass was taken from this very tree."""
    inv = parent.inventory
    start = proc.stat(root).start_time
    if inv.root_pid != root or inv.root_start_time != start:
        raise ImageError(parent.imgdir.path, f"is a dump of another tree (root pid {inv.root_pid} "
                         f"started at tick {inv.root_start_time}; pid {root} started at tick {start})")
