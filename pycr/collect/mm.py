"""The layout of an address space: VMAs, the mm fields, auxv and the exe link.

The current brk is not in any /proc file (stat has only start_brk), so it is
read by injecting brk(0), which returns the current break without moving it.
"""

import os

from .. import proc
from ..errors import PycrError, Unsupported
from ..abi import PROT_EXEC, PROT_READ, PROT_WRITE
from ..proc.smaps import SmapsReader


#: "[...]" mappings the kernel re-creates by itself: left out of the image.
KERNEL_MADE = ("[uprobes]",)       # uprobes' execute-out-of-line page, mapped again at the next probe hit


def file_identity(pid, vma):
    """(size, mtime in ns) of the file behind a file VMA, read through
    /proc/PID/map_files (the very file mapped, whatever its path is now)."""
    if vma.kind != "file":
        return 0, 0
    try:
        fd = proc.open_map_file(pid, vma.start, vma.end)
    except PycrError:
        return 0, 0
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return st.st_size, st.st_mtime_ns


def vma_record(vma, vmflags, pkey=0, identity=(0, 0)):
    prot = (PROT_READ if vma.read else 0) | (PROT_WRITE if vma.write else 0) | (PROT_EXEC if vma.exec else 0)
    return {
        "start": vma.start, "end": vma.end, "prot": prot, "shared": vma.shared,
        "pgoff": vma.offset, "dev_major": vma.dev_major, "dev_minor": vma.dev_minor,
        "inode": vma.inode, "path": vma.path + (" (deleted)" if vma.deleted else ""),
        "kind": vma.kind, "vmflags": vmflags,
        "shmem_id": vma.inode if vma.kind == "shmem" or vma.is_memfd else 0,
        "pkey": pkey,
        "file_size": identity[0], "file_mtime_ns": identity[1],
    }


def read_vmas(pid, entries=None):
    """[(proc.Vma, vmflags string, protection key)] of process pid, from smaps (which
    repeats maps' lines); entries: smaps already read while the task was frozen.
    Mappings the kernel makes again by itself ([uprobes]) are left out."""
    return [(entry.vma, entry.vmflags, entry.counters.get("ProtectionKey", 0))
            for entry in (entries if entries is not None else proc.smaps(pid))
            if entry.vma.path not in KERNEL_MADE]


def _coverage(vmas):
    """The address ranges vmas cover, adjacent VMAs joined (boundaries may move while
    pycr registers ranges with a userfaultfd, which lets neighbours merge)."""
    out = []
    for vma, *_ in vmas:
        if out and out[-1][1] == vma.start:
            out[-1][1] = vma.end
        else:
            out.append([vma.start, vma.end])
    return out


class Layout:
    """The VMAs of one frozen process, from the two /proc files that list them.

    maps costs a fraction of a millisecond. smaps adds each VMA's VmFlags (madvise and
    mlock state) and protection key, but behind it the kernel walks every page table,
    about 30 ms at 2 GiB resident, holding the mm's lock, so that an injected brk()
    waits for the walk. walk() starts it in a thread (SmapsReader); what needs only the
    maps (the objects behind fds and mappings, the pages to copy) goes on meanwhile, and
    flagged() waits for it.
    """

    def __init__(self, pid):
        self.pid = pid
        self.mapped = [(vma, "", 0) for vma in proc.maps(pid) if vma.path not in KERNEL_MADE]
        self._walk = None

    def walk(self):
        """Start the smaps walk (once); returns self."""
        if self._walk is None:
            self._walk = SmapsReader(self.pid)
        return self

    def flagged(self):
        """[(proc.Vma, vmflags string, protection key)] from smaps, over the same addresses as
        the maps read first. An injection that borrowed a scratch mapping while the walk ran
        is over by now, so a walk that saw one is read again; a second difference means the
        mappings changed under the frozen tree, and nothing is saved from it."""
        vmas = read_vmas(self.pid, self.walk()._walk.result())
        if _coverage(vmas) != _coverage(self.mapped):
            vmas = read_vmas(self.pid)
            if _coverage(vmas) != _coverage(self.mapped):
                raise PycrError(f"pid {self.pid}: its mappings changed while it was frozen "
                                "(smaps and maps disagree)")
        return vmas


def check_supported(pid, vmas):
    """Refuse by name what pycr cannot restore, before anything is written."""
    for vma, vmflags, *_ in vmas:
        flags = set(vmflags.split())
        where = f"{vma.start:#x}-{vma.end:#x}"
        if "ht" in flags:
            raise Unsupported(f"pid {pid}: hugetlb mapping {where} is not supported")
        if "ss" in flags:
            raise Unsupported(f"pid {pid}: shadow stack {where} is not supported")
        if vma.kind == "special":
            raise Unsupported(f"pid {pid}: kernel mapping {vma.path} at {where} is not supported")
        if "dp" in flags and (vma.shared or vma.kind not in ("anon", "heap", "stack")):
            raise Unsupported(f"pid {pid}: MAP_DROPPABLE mapping {where} of {vma.path or 'anonymous memory'} "
                              "is not supported")


def collect_mm(pid, vmas, brk, src=None):
    """The mm image body of process pid, given its VMAs read while frozen and its brk
    (injected brk(0): the current break is in no /proc file).
    src: the task to read /proc from (a live thread when the leader has exited)."""
    src = src or pid
    st = proc.stat(src)
    fields = {name: getattr(st, name) for name in (
        "start_code", "end_code", "start_data", "end_data", "start_brk",
        "start_stack", "arg_start", "arg_end", "env_start", "env_end")}
    fields["brk"] = brk
    try:
        exe = proc.exe(src)
    except PycrError:                   # proc maps its OSErrors: no exe link (an exited mm)
        exe = ""
    return {
        "pid": pid,
        "exe": exe,
        "mm": fields,
        "auxv": proc.auxv_bytes(src),
        "vmas": [vma_record(vma, flags, pkey, file_identity(src, vma)) for vma, flags, pkey in vmas],
    }
