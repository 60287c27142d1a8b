"""Range checks of what images say, against what this kernel allows.

Checksums say a file is the one the dump wrote, not that its values make
sense here: an owner may rewrite a set and its manifest, and a dump from a
machine with larger limits may not fit this one. Every address, length, fd
number and PID is checked here before it is used; the limits come from the
kernel, never from constants.
"""

import errno
import functools
import os

from pycr import proc
from pycr.abi import MAP_ANONYMOUS, MAP_FIXED_NOREPLACE, MAP_PRIVATE, NR, PROT_NONE, RLIMIT_NOFILE
from pycr.errors import ImageError
from pycr.formats.mm import MM_FIELDS
from pycr.native import core

PAGE = os.sysconf("SC_PAGE_SIZE")
UNCHECKED_KINDS = ("vsyscall",)       # the kernel's own page above the user address space


@functools.lru_cache(maxsize=None)
def task_size():
    """The end of the user address space of this kernel (TASK_SIZE), found by asking mmap.

    A page can be mapped at A exactly when A + PAGE <= TASK_SIZE (or something
    is mapped there already: EEXIST); a binary search over addresses finds the
    limit in about 50 probes, whatever the paging depth (4 or 5 levels).
    """
    lo, hi = 0, (1 << 64) // PAGE          # in pages: lo is mappable, hi is not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _mappable(mid * PAGE):
            lo = mid
        else:
            hi = mid
    return (lo + 1) * PAGE


def _mappable(addr):
    if addr < 1 << 16:
        return True         # below vm.mmap_min_addr: refused for another reason
    try:
        got = core.syscall(NR["mmap"], addr, PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
                           -1, 0)
    except OSError as exc:
        return exc.errno == errno.EEXIST
    core.syscall(NR["munmap"], got, PAGE)
    return got == addr




def pid_max():
    """PIDs are in (0, pid_max): /proc/sys/kernel/pid_max."""
    return proc.sysctl_int("kernel/pid_max")


def nr_open():
    """No fd number reaches this (the kernel's ceiling for RLIMIT_NOFILE): /proc/sys/fs/nr_open."""
    return proc.sysctl_int("fs/nr_open")


def check_tree(path, pstree):
    """PIDs and TIDs of pstree.img in (0, pid_max); groups and sessions in [0, pid_max),
    0 being a group or session whose leader lies outside the dumper's PID namespace
    (what /proc/PID/stat shows then; the restored task keeps the restorer's)."""
    limit = pid_max()
    for p in pstree.processes:
        for what, value in [("pid", p.pid)] + [("tid", t) for t in p.threads]:
            if not 0 < value < limit:
                raise ImageError(path, f"corrupt: pid {p.pid}: {what} {value} is not in (0, pid_max {limit})")
        for what, value in [("pgid", p.pgid), ("sid", p.sid)]:
            if not 0 <= value < limit:
                raise ImageError(path, f"corrupt: pid {p.pid}: {what} {value} is not below pid_max {limit}")
        if not 0 <= p.ppid < limit:
            raise ImageError(path, f"corrupt: pid {p.pid}: ppid {p.ppid} is not below pid_max {limit}")


def check_fds(path, pid, fds, core_img):
    """fd numbers unique and below nr_open. Not below the process's own RLIMIT_NOFILE: a program
    may lower it under an fd it holds (sshd's privilege-separated child sets it to 0); the fds
    are restored before the limits."""
    ceiling = nr_open()
    seen = set()
    for rec in fds:
        if not 0 <= rec.fd < ceiling or rec.fd in seen:
            raise ImageError(path, f"corrupt: pid {pid} fd {rec.fd} is repeated or not below {ceiling} "
                                   "(nr_open, the kernel's bound on fd numbers)")
        seen.add(rec.fd)


def check_mm(path, mm):
    """VMAs page aligned, ascending, disjoint and below TASK_SIZE; mm fields too."""
    top = task_size()
    prev_end = 0
    for vma in mm.vmas:
        if (vma.start >= vma.end or vma.start % PAGE or vma.end % PAGE or vma.start < prev_end
                or vma.pgoff % PAGE):
            raise ImageError(path, f"corrupt: VMA {vma.start:#x}-{vma.end:#x} is not page aligned "
                                   "or overlaps the one before")
        if vma.end > top and str(vma.kind) not in UNCHECKED_KINDS:
            raise ImageError(path, f"corrupt: VMA {vma.start:#x}-{vma.end:#x} ends above the user address "
                                   f"space of this kernel ({top:#x})")
        prev_end = vma.end
    for name in MM_FIELDS:
        value = mm.mm[name]
        if value > top:
            raise ImageError(path, f"corrupt: {name} {value:#x} is above the user address space ({top:#x})")


def check_runs(path, pagemap, limit=None):
    """Pagemap runs page aligned, non-empty, ascending, disjoint and below limit (default TASK_SIZE)."""
    limit = task_size() if limit is None else limit
    prev_end = 0
    for run in pagemap.entries:
        end = run.vaddr + run.nr_pages * PAGE
        if run.vaddr % PAGE or run.nr_pages == 0 or run.vaddr < prev_end or end > limit:
            raise ImageError(path, f"corrupt: pages run {run.vaddr:#x} x {run.nr_pages} is not page aligned, "
                                   f"empty, out of order or beyond {limit:#x}")
        prev_end = end
