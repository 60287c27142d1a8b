"""uffd-wp: userfaultfd write-protect (WP_ASYNC) + PAGEMAP_SCAN.

The target gets a userfaultfd of its own (injected, moved to a high fd number
so it does not collide with the program's fds); pycr takes a duplicate with
pidfd_getfd and does every ioctl from outside: UFFDIO_REGISTER in WP mode per
private VMA, then PAGEMAP_SCAN with WP_MATCHING|CHECK_WPASYNC, which reports
the pages written since the last scan and write-protects them again in the
same walk. The target's copy keeps the tracking alive between pycr runs; the
final dump closes it, and the kernel then drops every registration.

A VMA counts as tracked only if it lies inside the ranges this tracker
registered and the kernel still has it registered for asynchronous
write-protection: each VMA is scanned on its own with PM_SCAN_CHECK_WPASYNC,
which refuses (EPERM) a VMA that is not, before touching any of its pages.
mremap, munmap+mmap and exec all leave VMAs unregistered; those are copied
whole and registered anew. The VMAs come from maps, not smaps: smaps walks
every page table, which the pass reads in the background meanwhile.
"""

import fcntl
import os
import struct
from array import array

from .. import abi, leftovers, proc
from ..abi import (O_CLOEXEC, RLIMIT_NOFILE, UFFD_API, UFFD_LINK, UFFD_PYCR_FEATURES as FEATURES, UFFD_PYCR_FLAGS,
                   UFFD_USER_MODE_ONLY, UFFDIO_API, UFFDIO_REGISTER, UFFDIO_REGISTER_MODE_WP)
from ..collect.memory import SKIPPED_KINDS
from ..errors import PycrError, TaskGone
from ..log import log
from ..native import core
from ..ptrace import narrate
from ..ptrace.inject import Injector
from ..steps import deferred_signals
from . import runs as R
from .base import Tracker, plan_copy, present_pages, write_pages

HIGHEST_FD = 1023                    # keeps the target's fd table small


def candidate_vmas(vmas):
    """(start, end, prot_none) of the private VMAs whose pages a dump saves, from a task's maps."""
    return [(vma.start, vma.end, not (vma.read or vma.write or vma.exec))
            for vma in vmas if not (vma.shared or vma.kind in SKIPPED_KINDS)]


def contiguous(spans):
    """Merge (start, end) spans that touch: one scan ioctl per group."""
    out = []
    for start, end in spans:
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


class UffdProcess:
    """pycr's side of one target's userfaultfd."""

    def __init__(self, pid, target_fd, fd, created):
        self.pid = pid
        self.target_fd = target_fd   # number in the target
        self.fd = fd                 # our duplicate
        self.created = created       # made in this pass (undone by abort)
        self.pagemap = proc.open_pagemap(pid)

    def close(self):
        for fd in (self.fd, self.pagemap):
            if fd >= 0:
                os.close(fd)
        self.fd = self.pagemap = -1

    def register(self, start, end):
        """UFFDIO_REGISTER in WP mode; False when the kernel refuses this range."""
        arg = bytearray(struct.pack("<QQQQ", start, end - start, UFFDIO_REGISTER_MODE_WP, 0))
        try:
            fcntl.ioctl(self.fd, UFFDIO_REGISTER, arg, True)
            return True
        except OSError as exc:
            log.debug("pid %d: UFFDIO_REGISTER %#x-%#x: %s", self.pid, start, end, exc.strerror)
            return False

    def scan_written(self, start, end, check=True, narrated=True):
        """Runs written since the last scan in [start, end); they are write-protected again."""
        flags = abi.PM_SCAN_WP_MATCHING | (abi.PM_SCAN_CHECK_WPASYNC if check else 0)
        found, _ = core.pagemap_scan(self.pagemap, start, end, flags, abi.PAGE_IS_WRITTEN, 0, 0,
                                     abi.PAGE_IS_WRITTEN, narrated=narrated)
        return R.from_pairs((found[i], found[i + 1]) for i in range(0, len(found), 3))


def _free_high_fd(pid):
    soft = proc.rlimits(pid)[RLIMIT_NOFILE][0]
    used = set(proc.fds(pid))
    fd = min(soft, HIGHEST_FD + 1) - 1
    while fd in used:
        fd -= 1
    if fd < 3:
        raise PycrError(f"pid {pid}: no free fd number below its RLIMIT_NOFILE ({soft}) for the userfaultfd "
                        "the uffd-wp tracker puts in it: use --tracker soft-dirty or hash")
    return fd


class UffdWpTracker(Tracker):
    name = "uffd-wp"
    # The final dump normally closes the userfaultfd in the target. A migration keeps
    # the source frozen and then kills it, so closing it there would only add to the
    # downtime; on failure the migration takes it out itself.
    keep_in_target = False

    def __init__(self, parent=None):
        super().__init__(parent)
        self.procs = {}        # pid -> UffdProcess
        self.dirty = {}        # pid -> runs, or None for "all"
        self.armed = {}        # pid -> runs registered and write-protected by this pass
        self.tracked = {}      # pid -> runs still tracked from the parent pass
        self.to_register = {}  # pid -> [(start, end)] VMAs to register and arm
        self.final = False

    # -- frozen
    def while_frozen(self, pid, leader, final):
        super().while_frozen(pid, leader, final)
        self.final = final
        links = self._close_inherited(pid, leader)
        self._close_stray(pid, leader, links)
        vmas = candidate_vmas(proc.maps(pid))
        uffd = self._adopt(pid)
        tracked, dirty = array("Q"), array("Q")
        if uffd is not None:
            state = self.parent_of(pid).state(pid)
            registered = array("Q", state.registered)
            scanned = 0
            for start, end, _ in vmas:
                if not R.covers(registered, start, end):
                    continue
                try:
                    dirty.extend(uffd.scan_written(start, end, narrated=False))
                    tracked.extend((start, end - start))
                    scanned += 1
                except OSError as exc:
                    # EPERM: no longer registered (replaced, moved); the walk stopped before its pages
                    log.info("pid %d: scan %#x-%#x: %s; copying it whole", pid, start, end, exc.strerror)
            dirty = R.normalize(dirty)
            tracked = R.normalize(tracked)
            if narrate.enabled():
                narrate.log.debug("pid %d: pages written since the last pass, write-protected again, in each of its "
                                  "%d tracked VMAs: ioctl(/proc/PID/pagemap, PAGEMAP_SCAN, {flags=PM_SCAN_WP_MATCHING|"
                                  "PM_SCAN_CHECK_WPASYNC, category_mask=PAGE_IS_WRITTEN, return_mask=PAGE_IS_WRITTEN}) "
                                  "= %d regions, %d pages",
                                  pid, scanned, len(dirty) // 2, sum(dirty[1::2]) // core.PAGE_SIZE)
        elif not final:
            uffd = self._create(pid, leader)
        untracked = R.subtract(R.from_pairs((s, e) for s, e, _ in vmas), tracked)
        self.tracked[pid] = tracked
        self.dirty[pid] = R.union(dirty, untracked) if tracked else None
        self.to_register[pid] = [(s, e) for s, e, prot_none in vmas
                                 if not prot_none and not R.covers(tracked, s, e)]
        if final and uffd is not None and not self.keep_in_target:
            self._close_in_target(uffd, leader)
        if uffd is not None:
            self.procs[pid] = uffd
        # Arm the new ranges now: registering after the thaw would use ranges the
        # program may have grown or moved since, and split its VMAs (a later
        # mremap of the whole mapping would then fail).
        self.armed[pid] = self._arm(pid)

    def _owners(self):
        """(pid, fd) of every pycr userfaultfd known in the tree: the parent's and this pass's."""
        out = [(u.pid, u.target_fd) for u in self.procs.values()]
        if self.parent:
            for pid, start_time in self.parent.start_times.items():
                try:
                    alive = proc.stat(pid).start_time == start_time
                except TaskGone:
                    alive = False
                state = self.parent.state(pid) if alive else None
                if state is not None and state.uffd_fd >= 0:
                    out.append((pid, state.uffd_fd))
        return out

    def _close_inherited(self, pid, leader):
        """Close copies of pycr's userfaultfds that pid inherited by fork -> pid's fds (proc.fds)
        without them.

        fork copies the fd table, so a child holds its parent's uffd: that is
        pycr's, not the program's, and must not stay in the child (nor reach
        its files image). Told apart with kcmp against each known owner.
        """
        parent = self.parent_of(pid)
        state = parent.state(pid) if parent else None
        own = state.uffd_fd if state is not None else -1
        links = proc.fds(pid)
        suspects = [fd for fd, link in links.items() if link == UFFD_LINK and fd != own]
        if not suspects:
            return links
        owners = [(p, f) for p, f in self._owners() if p != pid]
        recorded = {f for _, f in owners}
        inherited = []
        for fd in suspects:
            same = False
            for owner, owner_fd in owners:
                try:
                    same = core.kcmp(pid, owner, abi.KCMP_FILE, fd, owner_fd) == 0
                except OSError:
                    same = False
                if same:
                    break
            if same or fd in recorded:
                inherited.append(fd)
        if inherited:
            with Injector(leader) as inj:
                for fd in inherited:
                    inj.call("close", fd)
            log.info("pid %d: closed the userfaultfd(s) %s it inherited by fork", pid, inherited)
        return {fd: link for fd, link in links.items() if fd not in inherited}

    def _close_stray(self, pid, leader, links):
        """Close the userfaultfd a killed pycr (or an abandoned chain) left in pid, before this pass
        registers its own: a VMA takes one userfaultfd at a time, so the new registration would fail
        where the old one holds, and closing the old one later unregisters those VMAs: the next pass
        would copy them whole."""
        parent = self.parent_of(pid)
        state = parent.state(pid) if parent else None
        own = (state.uffd_fd,) if state is not None and state.tracker == self.name and state.uffd_fd >= 0 else ()
        leftovers.close_stray_uffds(pid, leader, keep=own, links=links)

    def _adopt(self, pid):
        """The userfaultfd the parent pass left in pid, or None (with a warning if it was lost)."""
        parent = self.parent_of(pid)
        state = parent.state(pid) if parent else None
        if state is None or state.tracker != self.name or state.uffd_fd < 0:
            if parent:
                log.warning("pid %d: no uffd-wp state in %s: copying all its memory",
                            pid, parent.imgdir.path)
            return None
        try:
            link = proc.fd_link(pid, state.uffd_fd)
        except TaskGone:
            link = ""
        if link != UFFD_LINK:
            log.warning("pid %d: its userfaultfd (fd %d) is gone, closed or lost in an exec: "
                        "copying all its memory", pid, state.uffd_fd)
            return None
        return UffdProcess(pid, state.uffd_fd, core.dup_from(pid, state.uffd_fd), created=False)

    def _create(self, pid, leader):
        """Inject userfaultfd(), move it to a high fd, take a duplicate, enable WP_ASYNC."""
        target_fd = _free_high_fd(pid)
        # Whole or not at all: a stop signal in between would leave an fd nobody knows.
        with deferred_signals(), Injector(leader) as inj:
            rfd = inj.check("userfaultfd", UFFD_PYCR_FLAGS | UFFD_USER_MODE_ONLY)
            try:
                inj.check("dup3", rfd, target_fd, O_CLOEXEC)
            finally:
                inj.check("close", rfd)
            try:
                uffd = UffdProcess(pid, target_fd, core.dup_from(pid, target_fd), created=True)
            except BaseException:
                inj.call("close", target_fd)
                raise
            self.procs[pid] = uffd
        arg = bytearray(struct.pack("<QQQ", UFFD_API, FEATURES, 0))
        try:
            fcntl.ioctl(uffd.fd, UFFDIO_API, arg, True)
        except OSError as exc:
            raise PycrError(f"pid {pid}: UFFDIO_API with WP_ASYNC: {exc.strerror}") from None
        log.info("pid %d: userfaultfd at fd %d, WP_ASYNC enabled", pid, target_fd)
        return uffd

    def _close_in_target(self, uffd, leader):
        """Take the userfaultfd out of the target's fd table. pycr's duplicate keeps
        tracking alive until finish(): the final rescan still needs it, and closing
        the last reference is what makes the kernel unregister every range."""
        with Injector(leader) as inj:
            inj.call("close", uffd.target_fd)
        log.info("pid %d: closed its userfaultfd (fd %d)", uffd.pid, uffd.target_fd)

    def _rescan(self, pid):
        """Add what was written after while_frozen's scan to the dirty set.

        The tree is frozen, but pycr's own injected syscalls return to user mode
        and the kernel then updates the rseq area (cpu_id) in the task's TLS;
        without this, the final dump would keep the parent's stale copy of it.
        """
        uffd, tracked = self.procs.get(pid), self.tracked.get(pid)
        if uffd is None or not tracked or self.dirty.get(pid) is None:
            return
        areas = _rseq_pages(pid)
        where = tracked if areas is None else R.intersect(tracked, areas)
        late = array("Q")
        for start, end in contiguous(R.pairs(where)):
            late.extend(uffd.scan_written(start, end, check=False))
        self.dirty[pid] = R.union(self.dirty[pid], R.normalize(late))

    def hidden_fds(self, pid):
        uffd = self.procs.get(pid)
        return {uffd.target_fd} if uffd else set()

    # -- copying
    def _arm(self, pid):
        """Register the untracked VMAs and write-protect them (the first scan reports all);
        runs while the tree is frozen."""
        uffd = self.procs.get(pid)
        registered = array("Q", self.tracked.get(pid, array("Q")))
        if uffd is None or self.final:
            return registered
        for start, end in self.to_register.get(pid, []):
            if uffd.register(start, end):
                try:
                    uffd.scan_written(start, end, check=False)
                    registered.extend((start, end - start))
                except OSError as exc:
                    log.debug("pid %d: arming %#x-%#x: %s", pid, start, end, exc.strerror)
        return R.normalize(registered)

    def save_pages(self, pid, vmas, imgdir, live):
        registered = self.armed.get(pid, array("Q"))
        if self.final:
            self._rescan(pid)
        present = present_pages(pid, vmas)
        save, in_parent = plan_copy(present, self.dirty.get(pid), self.coverage(pid))
        written = write_pages(pid, vmas, imgdir, save, in_parent, live)
        uffd = self.procs.get(pid)
        if uffd is not None and not self.final:
            imgdir.write("tracker", self.state_record(pid, uffd_fd=uffd.target_fd,
                                                      registered=registered.tobytes()), pid)
        return written

    def finish(self):
        for uffd in self.procs.values():
            uffd.close()
        self.procs.clear()

    def abort(self, leaders):
        """Close the userfaultfds this pass created, in the targets too."""
        for pid, uffd in list(self.procs.items()):
            if uffd.created and pid in leaders:
                try:
                    with Injector(leaders[pid]) as inj:
                        inj.call("close", uffd.target_fd)
                except (PycrError, OSError) as exc:
                    log.warning("pid %d: could not close its userfaultfd: %s", pid, exc)
        self.finish()


def _rseq_pages(pid):
    """The pages holding the rseq areas of pid's threads (normalized runs), the only memory the
    kernel writes in a frozen task (on each return from an injected call); None where the
    kernel cannot say (no PTRACE_GET_RSEQ_CONFIGURATION): then all tracked memory is scanned."""
    from ..ptrace.thread import Thread
    page = core.PAGE_SIZE
    out = array("Q")
    try:
        for tid in proc.tasks(pid):
            ptr, size, _sig = Thread(tid).rseq_config()
            if ptr and size:
                start = ptr - ptr % page
                out.extend((start, -(-(ptr + size - start) // page) * page))
    except (OSError, PycrError):
        return None
    return R.normalize(out)
