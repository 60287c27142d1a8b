"""Rebuilding one address space inside a stub, by injected syscalls.

Order matters and is the whole point of this module:
1. map a workspace (trampoline page + scratch) in a hole of the *dumped*
   layout, so nothing later mapped at a dumped address can collide with it;
2. unmap every mapping of the stub, keeping only the workspace and the
   kernel's special mappings;
3. move [vvar], [vvar_vclock] and [vdso] to the dumped addresses with mremap,
   all by the same delta (the kernel keeps its vdso pointer in step);
4. map every dumped VMA at its address, writable while pages are filled;
5. set the dumped protections, madvise flags and locks;
6. PR_SET_MM_MAP for the mm fields, auxv and the exe link (the exe link can
   change only once no VMA of the old executable, the stub, is left).
The workspace itself is unmapped at the very end of the restore (restorer).
"""

import errno
import os
import struct

from pycr import proc
from pycr.abi import (AT_FDCWD, MADVISE_NAMED, MAP_ANONYMOUS, MAP_DROPPABLE, MAP_FIXED, MAP_FIXED_NOREPLACE,
                      MAP_GROWSDOWN, MAP_NORESERVE, MAP_PRIVATE, MAP_SHARED, MREMAP_FIXED, MREMAP_MAYMOVE, NR,
                      O_CLOEXEC, O_RDONLY, O_RDWR, PR_SET_MM, PR_SET_MM_MAP, PR_SET_VMA, PR_SET_VMA_ANON_NAME,
                      PROT_EXEC, PROT_READ, PROT_WRITE)
from pycr.errors import RestoreError
from pycr.ptrace import batch
from pycr.log import log
from pycr import sysinfo
from pycr.restore import ghost, lazy as lazy_mod, sysvshm
from pycr.stats import count, phase
from pycr.sysinfo import page_size

PAGE = page_size()
MM_MAP = struct.Struct("<11QQII")       # struct prctl_mm_map (104 bytes)
KEEP_EXE = 0xFFFFFFFF

WORKSPACE_SIZE = 32 * PAGE              # 1 trampoline page + 31 pages of scratch
HEAP_ROOM = 2 << 20                     # keep clear of heap growth next to a hole


def gap():
    """Room left on each side of pycr's own mappings: a neighbour may be a stack
    (whose guard gap is a boot parameter) or a heap that grows."""
    return max(HEAP_ROOM, sysinfo.stack_guard_gap() + PAGE)

SPECIAL = ("vvar", "vvar_vclock", "vdso")
NOT_MAPPED = ("vdso", "vvar", "vvar_vclock", "vsyscall")
MADVISE = {flag: advice for flag, (advice, _) in MADVISE_NAMED.items()}
SYS_PKEY_MPROTECT, SYS_PKEY_ALLOC, SYS_PKEY_FREE = NR["pkey_mprotect"], NR["pkey_alloc"], NR["pkey_free"]
DELETED = " (deleted)"


def kind_of(vma):
    return str(vma.kind)


def hole_candidates(vmas, size, floor=None, ceiling=None):
    """Addresses where `size` bytes fit in the holes of `vmas`, widest hole first.

    floor and ceiling default to this kernel's mmap_min_addr and TASK_SIZE.
    """
    floor = sysinfo.mmap_min_addr() if floor is None else floor
    ceiling = sysinfo.task_size() if ceiling is None else ceiling
    room = gap()
    ranges = sorted((v.start, v.end) for v in vmas if kind_of(v) != "vsyscall" and v.start < ceiling)
    gaps, prev = [], floor
    for start, end in ranges:
        if start > prev:
            gaps.append((prev, start))
        prev = max(prev, end)
    if ceiling > prev:
        gaps.append((prev, ceiling))
    gaps.sort(key=lambda g: g[1] - g[0], reverse=True)
    out = []
    for lo, hi in gaps:
        if hi - lo >= size + 2 * room:
            out.append((hi - room - size) & ~(PAGE - 1))
            out.append((lo + room + PAGE - 1) & ~(PAGE - 1))
    return out


def map_workspace(remote, image_vmas):
    """Map trampoline + scratch at an address free in both layouts; switch to it."""
    for addr in hole_candidates(image_vmas, WORKSPACE_SIZE):
        res = remote.call("mmap", addr, WORKSPACE_SIZE, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
        if res == addr:
            break
        if res >= 0:
            remote.check("munmap", res, WORKSPACE_SIZE, what=f"{res:#x}")
        elif res != -errno.EEXIST:
            raise RestoreError(f"pid {remote.pid}: mmap of the workspace failed: {errno.errorcode.get(-res, res)}")
    else:
        raise RestoreError(f"pid {remote.pid}: no hole for pycr's workspace in the dumped layout")
    remote.write(addr, b"\x0f\x05\xcc")
    remote.write(addr + batch.WORKSPACE_AT, batch.WORKSPACE_CODE)    # Injector.call_batch's loop
    remote.check("mprotect", addr, PAGE, PROT_READ | PROT_EXEC, what=f"{addr:#x}, r-x")
    remote.retarget(addr)
    remote.use_scratch(addr + PAGE, WORKSPACE_SIZE - PAGE)
    log.debug("pid %d: workspace at %#x", remote.pid, addr)
    return addr


def unmap_stub(remote, workspace):
    """munmap every mapping of the stub but the workspace and the kernel's specials."""
    for vma in proc.maps(remote.real):
        if vma.kind in NOT_MAPPED or _overlaps(vma, workspace):
            continue
        remote.check("munmap", vma.start, vma.size, what=f"{vma.start:#x}, {vma.size:#x}")


def _overlaps(vma, workspace):
    return vma.start < workspace + WORKSPACE_SIZE and workspace < vma.end


def place_specials(remote, image_vmas):
    """Move the stub's vvar/vvar_vclock/vdso to the dumped addresses (same delta for all)."""
    have = {v.kind: v for v in proc.maps(remote.real) if v.kind in SPECIAL}
    want = {kind_of(v): v for v in image_vmas if kind_of(v) in SPECIAL}
    if not want:
        for v in have.values():
            remote.check("munmap", v.start, v.size, what=f"[{v.kind}]")
        return
    if set(have) != set(want):
        raise RestoreError(f"pid {remote.pid}: dumped special mappings {sorted(want)} differ from "
                           f"this kernel's {sorted(have)}")
    delta = want["vdso"].start - have["vdso"].start
    for kind, v in have.items():
        w = want[kind]
        if w.start - v.start != delta or w.end - w.start != v.size:
            raise RestoreError(f"pid {remote.pid}: the dumped [{kind}] does not fit this kernel's vdso layout")
    if delta == 0:
        return
    lo = min(v.start for v in have.values())
    hi = max(v.end for v in have.values())
    if lo + delta < hi and lo < hi + delta:
        # The move overlaps itself: go through a free spot first.
        room = gap()
        temp = remote.check("mmap", 0, (hi - lo) + 2 * room, 0, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0,
                            what="temporary reservation")
        remote.check("munmap", temp, (hi - lo) + 2 * room, what="temporary reservation")
        step = temp + room - lo
        _move(remote, have, step)
        have = {k: _shifted(v, step) for k, v in have.items()}
        delta -= step
    _move(remote, have, delta)
    log.info("pid %d: moved vvar/vdso to %#x with mremap", remote.pid, want["vdso"].start)


class _Range:
    def __init__(self, start, end):
        self.start, self.end = start, end

    @property
    def size(self):
        return self.end - self.start


def _shifted(v, delta):
    return _Range(v.start + delta, v.end + delta)


def _move(remote, have, delta):
    for kind, v in have.items():
        remote.check("mremap", v.start, v.size, v.size, MREMAP_MAYMOVE | MREMAP_FIXED, v.start + delta,
                     what=f"[{kind}] -> {v.start + delta:#x}")


def _strip_deleted(path):
    return path[: -len(DELETED)] if path.endswith(DELETED) else path


def map_vmas(remote, mm, shmem_paths):
    """mmap every dumped VMA at its address. Private ones are writable until filled.

    shmem_paths: shmem_id -> a path the task can open for that shared object.
    """
    opened, attached = {}, set()
    try:
        for vma in mm.vmas:
            kind = kind_of(vma)
            if kind in NOT_MAPPED:
                continue
            flags = set(vma.vmflags.split())
            size = vma.end - vma.start
            extra = MAP_NORESERVE if "nr" in flags else 0
            if sysvshm.is_sysv_vma(vma):
                target = shmem_paths.get(vma.shmem_id)
                if not isinstance(target, tuple):
                    raise RestoreError(f"pid {remote.pid}: SysV shared memory at {vma.start:#x}: this restore "
                                       "made no segment for it")
                sysvshm.attach(remote, mm, vma, target, attached)
            elif not vma.shared:
                prot = vma.prot | PROT_READ | PROT_WRITE
                if kind == "file":
                    fd = _open_for_map(remote, opened, backing_path(vma, shmem_paths), O_RDONLY)
                    remote.check("mmap", vma.start, size, prot, MAP_PRIVATE | MAP_FIXED | extra, fd, vma.pgoff,
                                 what=f"{vma.start:#x}, {vma.path}")
                else:
                    if "gd" in flags:
                        extra |= MAP_GROWSDOWN
                    kind_flag = MAP_DROPPABLE if "dp" in flags else MAP_PRIVATE
                    res = remote.call("mmap", vma.start, size, prot, kind_flag | MAP_ANONYMOUS | MAP_FIXED | extra,
                                      -1, 0)
                    if res != vma.start:
                        what = "MAP_DROPPABLE " if "dp" in flags else ""
                        raise RestoreError(f"pid {remote.pid}: mmap of {what}anonymous memory at {vma.start:#x} "
                                           f"failed: {errno_name(res) if res < 0 else hex(res)}")
            else:
                path = shmem_paths[vma.shmem_id] if kind == "shmem" else backing_path(vma, shmem_paths)
                # read-only and never writable (no VM_MAYWRITE): a sealed memfd refuses F_SEAL_WRITE otherwise
                mode = O_RDWR if (vma.prot & PROT_WRITE or "mw" in flags) else O_RDONLY
                fd = _open_for_map(remote, opened, path, mode)
                remote.check("mmap", vma.start, size, vma.prot, MAP_SHARED | MAP_FIXED | extra, fd, vma.pgoff,
                             what=f"{vma.start:#x}, shared {vma.path}")
            remote.reset_scratch()
    finally:
        for fd in opened.values():
            remote.call("close", fd)
    log.info("pid %d: mapped %d VMAs", remote.pid, len(mm.vmas))


def backing_path(vma, shmem_paths):
    """The path a task opens to map a file VMA: a memfd or a deleted file pycr made again
    (found in shmem_paths by shmem_id or ghost.vma_key), else the file's own path."""
    if vma.path.startswith("/memfd:") and vma.shmem_id in shmem_paths:
        return shmem_paths[vma.shmem_id]
    if vma.path.endswith(DELETED):
        found = shmem_paths.get(ghost.vma_key(vma))
        if found is not None:
            return found
    return _strip_deleted(vma.path)


def _open_for_map(remote, opened, path, mode):
    key = (path, mode)
    if key not in opened:
        res = remote.call("openat", AT_FDCWD, remote.put_str(path), mode | O_CLOEXEC, 0)
        if res < 0:
            raise RestoreError(f"pid {remote.pid}: cannot open mapped file {path}: {errno_name(res)}")
        opened[key] = res
    return opened[key]


def errno_name(res):
    return os.strerror(-res)


def finish_vmas(remote, mm):
    """Dumped protections, protection keys, names, madvise flags and mlock, once the pages are in."""
    keys = PkeyAllocator(remote)
    try:
        for vma in mm.vmas:
            if kind_of(vma) in NOT_MAPPED:
                continue
            size = vma.end - vma.start
            pkey = getattr(vma, "pkey", 0)
            if pkey:
                keys.ensure(pkey, vma)
                remote.check(SYS_PKEY_MPROTECT, vma.start, size, vma.prot, pkey,
                             what=f"{vma.start:#x}, key {pkey}")
            elif not vma.shared and vma.prot != (vma.prot | PROT_READ | PROT_WRITE):
                remote.check("mprotect", vma.start, size, vma.prot, what=f"{vma.start:#x}")
            apply_vma_state(remote, vma)
    finally:
        keys.free_extra()


def apply_vma_state(remote, vma):
    """The anonymous name, madvise state and mlock of one mapped VMA, as smaps showed them."""
    size = vma.end - vma.start
    where = f"{vma.start:#x}-{vma.end:#x}"
    name = anon_name(vma)
    if name is not None and not vma.shared:
        res = remote.call("prctl", PR_SET_VMA, PR_SET_VMA_ANON_NAME, vma.start, size, remote.put_str(name))
        remote.reset_scratch()
        if res < 0:
            raise RestoreError(f"pid {remote.pid}: cannot name {where} [anon:{name}] with PR_SET_VMA_ANON_NAME: "
                               f"{errno_name(res)}")
    flags = vma.vmflags.split()
    for flag in flags:
        advice = MADVISE_NAMED.get(flag)
        if advice is not None:
            res = remote.call("madvise", vma.start, size, advice[0])
            if res < 0:
                raise RestoreError(f"pid {remote.pid}: madvise {where} {advice[1]} (VmFlags {flag}) failed: "
                                   f"{errno_name(res)}")
    if "lo" in flags:
        remote.call("mlock2", vma.start, size, 0)


def check_vmas(pid, mm):
    """Refuse, before any task exists, VMA state this machine cannot give back."""
    for vma in mm.vmas:
        if getattr(vma, "pkey", 0) and not sysinfo.has_pku():
            raise RestoreError(f"pid {pid}: {vma.start:#x}-{vma.end:#x} uses protection key {vma.pkey}, "
                               "but this CPU has no protection keys (no pku/ospke in /proc/cpuinfo)")


def anon_name(vma):
    """NAME of a VMA dumped as "[anon:NAME]" or "[anon_shmem:NAME]", else None."""
    for prefix in ("[anon:", "[anon_shmem:"):
        if vma.path.startswith(prefix) and vma.path.endswith("]"):
            return vma.path[len(prefix):-1]
    return None


class PkeyAllocator:
    """Memory protection keys with the dumped numbers, allocated in the restored task.

    pkey_alloc hands out the lowest free key, so keys are allocated until the
    wanted number comes; those taken on the way and never wanted are freed at the end.
    """

    def __init__(self, remote):
        self.remote = remote
        self.have, self.used = set(), set()

    def ensure(self, key, vma):
        self.used.add(key)
        while key not in self.have:
            got = self.remote.call(SYS_PKEY_ALLOC, 0, 0)
            if got < 0:
                why = errno_name(got) if sysinfo.has_pku() else "this CPU has no protection keys (no pku/ospke)"
                raise RestoreError(f"pid {self.remote.pid}: {vma.start:#x}-{vma.end:#x} uses protection key "
                                   f"{key}, pkey_alloc failed: {why}")
            self.have.add(got)

    def free_extra(self):
        for key in sorted(self.have - self.used):
            self.remote.call(SYS_PKEY_FREE, key)
        self.have &= self.used


def set_mm_map(remote, mm, exe_link=True):
    """PR_SET_MM_MAP: code/data/brk/stack/arg/env, auxv and /proc/PID/exe.

    exe_link=False keeps the current exe link: the kernel refuses to change it
    (EBUSY) while a VMA of the old executable is mapped, as it is when a
    replica's address space is only updated.
    """
    exe_fd = KEEP_EXE
    exe = _strip_deleted(mm.exe)
    if exe_link and exe and not mm.exe.endswith(DELETED):
        res = remote.call("openat", AT_FDCWD, remote.put_str(exe), O_RDONLY | O_CLOEXEC, 0)
        if res < 0:
            raise RestoreError(f"pid {remote.pid}: cannot open the executable {exe}: {errno_name(res)}")
        exe_fd = res
    try:
        f = mm.mm
        auxv = bytes(mm.auxv)
        auxv_addr = remote.put(auxv) if auxv else 0
        blob = MM_MAP.pack(f.start_code, f.end_code, f.start_data, f.end_data, f.start_brk, f.brk,
                           f.start_stack, f.arg_start, f.arg_end, f.env_start, f.env_end,
                           auxv_addr, len(auxv), exe_fd)
        addr = remote.put(blob)
        remote.check("prctl", PR_SET_MM, PR_SET_MM_MAP, addr, MM_MAP.size, 0, what="PR_SET_MM_MAP")
    finally:
        if exe_fd != KEEP_EXE:
            remote.call("close", exe_fd)
        remote.reset_scratch()
    log.info("pid %d: PR_SET_MM_MAP (mm fields, %d bytes of auxv, exe %s)", remote.pid, len(mm.auxv), exe)


def rebuild(remote, mm, chain, shmem_paths, final=True, pidfd=-1, lazy=None):
    """Steps 1-6 for one process (its threads do not exist yet) -> (workspace address,
    bytes of pages written). Not final (a replica that later passes update): the
    private mappings stay writable and step 5 is left for the last pass. pidfd: the
    task's fd of pycr's pidfd, if it has one: then it reads its pages in itself.
    lazy (a restore.lazy.LazyLink): anonymous private memory is left to the lazy-pages
    daemon, its uffd handed over before step 5 (whose mlock would touch it)."""
    workspace, skip = prepare(remote, mm, chain, shmem_paths, lazy)
    with phase("mappings"):
        with phase("page fill"):
            written = chain.fill_task(remote.real, str(remote.pid), remote, pidfd, skip=skip)
        count("pages filled", written // PAGE)
    complete(remote, mm, skip, final, lazy)
    return workspace, written


def prepare(remote, mm, chain, shmem_paths, lazy=None):
    """Steps 1-3 of rebuild: the address space laid out, ready to be filled ->
    (workspace address, the ranges left to the lazy-pages daemon)."""
    with phase("mappings"):
        workspace = map_workspace(remote, mm.vmas)
        unmap_stub(remote, workspace)
        place_specials(remote, mm.vmas)
        map_vmas(remote, mm, shmem_paths)
        skip = lazy_mod.lazy_ranges(mm, chain, str(remote.pid)) if lazy is not None else ()
    return workspace, skip


def complete(remote, mm, skip=(), final=True, lazy=None):
    """Steps 5-6 of rebuild, once the pages are in."""
    with phase("mappings"):
        if skip:
            lazy.hand_over(remote, skip)
        if final:
            finish_vmas(remote, mm)
        set_mm_map(remote, mm)
