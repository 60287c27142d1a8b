"""SysV shared memory: segments made again by pycr, attached in each task by an injected shmat.

Before any task exists pycr makes every segment the tree had attached: with
its key, its id where /proc/sys/kernel/shm_next_id lets pycr choose it, its
size, mode and owner, and fills it through /proc/self/map_files of an
attachment of its own. A segment of the same key and id that is still there
unattached (the dumped tree was killed, the segment outlived it) is the one
dumped: it is reused and refilled. A key another segment holds on this host
is refused by name. Each task then attaches the segment at the address it
had (`attach`, from restore/mm.py), and once all are attached a segment
that was marked for removal (IPC_RMID while attached) is marked again.

`pycr migrate` on one host (options.current().sysv_handover) cannot make a
segment beside the source's: the source holds its key and id until it is
killed. The replica attaches the source's own segment instead (same id, key
and size): it is never written by pycr, its contents are the source's at
every instant, and once the source is killed the replica's attachments keep
it. A replica fed from images alone (`pycr restore --follow`) makes its
segments as a restore does and refills them every pass (`refresh`).
"""

import ctypes
import os

from pycr import options, proc
from pycr.abi import (IPC_CREAT, IPC_EXCL, IPC_PRIVATE, IPC_RMID, IPC_SET, IPC_STAT, PROT_EXEC, PROT_WRITE,
                      SHM_DEST, SHM_EXEC, SHM_RDONLY)
from pycr.errors import ImageError, RestoreError
from pycr.log import log
from pycr.sysinfo import page_size

IMAGE = "sysvshm"
PAGE = page_size()
SIZE_MAX = 1 << 46
NEXT_ID = "/proc/sys/kernel/shm_next_id"
SHMID_DS = 112                  # sizeof(struct shmid64_ds) on x86_64; ipc64_perm: uid at 4, gid at 8, mode at 20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
_libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_libc.shmat.restype = ctypes.c_void_p
_libc.shmdt.argtypes = [ctypes.c_void_p]
_libc.shmctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]


def _errno():
    return os.strerror(ctypes.get_errno())


def check(path, body, processes):
    """Segments sane; every SysV attachment of an mm image names one."""
    segs = {}
    for s in body.segments if body else ():
        if s.shmid in segs or not 0 < s.size <= SIZE_MAX or s.mode > 0o7777:
            raise ImageError(path, f"corrupt: segment {s.shmid} is listed twice or has size {s.size}, mode {s.mode:o}")
        segs[s.shmid] = s
    for p in processes:
        for vma in p.mm.vmas:
            if is_sysv_vma(vma):
                s = segs.get(vma.shmem_id)
                if s is None or vma.pgoff % PAGE or vma.pgoff + (vma.end - vma.start) > _rounded(s.size):
                    raise ImageError(path, f"corrupt: pid {p.pid}: SysV attachment at {vma.start:#x} has no segment "
                                           "or lies outside it")


def is_sysv_vma(vma):
    return str(vma.kind) == "shmem" and vma.path.startswith("/SYSV")


def _rounded(size):
    return (size + PAGE - 1) & ~(PAGE - 1)


def holder(images):
    """The Segments of this restore (made at the first call)."""
    return images.holder("sysvshm", Segments)


class Segments:
    """The segments of one restore: dumped shmid -> (real id, size)."""

    def __init__(self, images):
        self.images = images
        body = images.objects.get(IMAGE)
        self.segments = list(body.segments) if body else []
        self.made = {}          # dumped shmid -> real shmid
        self.created = []       # real ids pycr created (removed again if the restore fails)
        self.taken = set()      # dumped shmids that are the migration source's own segments

    def check_host(self, segments=None):
        """Refuse a key that another segment holds on this host, before anything is made."""
        segments = self.segments if segments is None else segments
        table = proc.sysv_shm() if segments else {}
        for s in segments:
            if s.key == IPC_PRIVATE:
                continue
            for row in table.values():
                if row["key"] & 0xFFFFFFFF == s.key and not self._is_leftover(row, s) and not _is_source(row, s):
                    raise RestoreError(f"SysV shared memory key {s.key:#x} is in use on this host by segment "
                                       f"{row['shmid']} (remove it with ipcrm, or restore elsewhere)")

    @staticmethod
    def _is_leftover(row, s):
        """The dumped segment itself, outliving its killed tree: same key, id and size, unattached."""
        return (row["shmid"] == s.shmid and row["key"] & 0xFFFFFFFF == s.key and row["size"] == s.size
                and row["nattch"] == 0 and not row["perms"] & SHM_DEST)

    def make_all(self):
        self.check_host()
        table = proc.sysv_shm() if self.segments else {}
        for s in self.segments:
            self._make(s, table)

    def refresh(self, images):
        """An incremental restore's next pass: segments pycr made are zeroed and filled with its
        contents (the replica's attachments see them at once), new ones made; the source's own
        are left alone."""
        self.images = images
        body = images.objects.get(IMAGE)
        self.segments = list(body.segments) if body else []
        new = [s for s in self.segments if s.shmid not in self.made]
        self.check_host(new)
        table = proc.sysv_shm() if new else {}
        for s in self.segments:
            if s.shmid not in self.made:
                self._make(s, table)
            elif s.shmid not in self.taken:
                self._fill(s, self.made[s.shmid], reused=True)
                self._set_owner(s, self.made[s.shmid])
                log.info("SysV segment %d refilled from this pass", self.made[s.shmid])

    def _make(self, s, table):
        row = table.get(s.shmid)
        if _is_source(row, s):
            self.made[s.shmid] = s.shmid
            self.taken.add(s.shmid)
            log.info("SysV segment %d (key %#x): the migration source's own, attached as it is", s.shmid, s.key)
            return
        if row is not None and self._is_leftover(row, s):
            real = s.shmid
            log.info("SysV segment %d (key %#x): still there unattached, reused", s.shmid, s.key)
        else:
            real = self._create(s, taken=row is not None)
        self.made[s.shmid] = real
        self._fill(s, real, reused=real == s.shmid and row is not None)
        self._set_owner(s, real)

    def _create(self, s, taken):
        chose = False
        if not taken and os.path.exists(NEXT_ID):
            try:
                with open(NEXT_ID, "w") as f:
                    f.write(str(s.shmid))
                chose = True
            except OSError as exc:
                log.info("cannot choose SysV ids (%s: %s)", NEXT_ID, exc.strerror)
        real = _libc.shmget(s.key, s.size, IPC_CREAT | IPC_EXCL | (s.mode & 0o777))
        if real < 0:
            raise RestoreError(f"SysV segment {s.shmid} (key {s.key:#x}, {s.size} bytes): shmget failed: {_errno()}")
        self.created.append(real)
        if real != s.shmid:
            why = "its id is taken" if taken else "ids cannot be chosen here" if not chose else "the kernel gave another"
            log.warning("SysV segment %d comes back as id %d: %s", s.shmid, real, why)
        log.info("SysV segment %d (key %#x, %d bytes) made with shmget%s", real, s.key, s.size,
                 " at the id written to shm_next_id" if chose else "")
        return real

    def _fill(self, s, real, reused):
        addr = _libc.shmat(real, None, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise RestoreError(f"SysV segment {real}: shmat in pycr failed: {_errno()}")
        try:
            fd = os.open(f"/proc/self/map_files/{addr:x}-{addr + _rounded(s.size):x}", os.O_RDWR | os.O_CLOEXEC)
            try:
                if reused:
                    ctypes.memset(addr, 0, s.size)      # pages the image does not hold read as zeros
                self.images.pages.fill_fd(fd, f"shmem-{s.shmid}")
            finally:
                os.close(fd)
        except OSError as exc:
            raise RestoreError(f"SysV segment {real}: cannot fill it through /proc/self/map_files: "
                               f"{exc.strerror}") from None
        finally:
            _libc.shmdt(addr)

    def _set_owner(self, s, real):
        buf = ctypes.create_string_buffer(SHMID_DS)
        if _libc.shmctl(real, IPC_STAT, buf) < 0:
            raise RestoreError(f"SysV segment {real}: IPC_STAT failed: {_errno()}")
        for off, value in ((4, s.uid), (8, s.gid), (20, s.mode & 0o777)):
            ctypes.memmove(ctypes.addressof(buf) + off, value.to_bytes(4, "little"), 4)
        if _libc.shmctl(real, IPC_SET, buf) < 0:
            raise RestoreError(f"SysV segment {real}: IPC_SET of owner {s.uid}:{s.gid} mode {s.mode & 0o777:o} "
                               f"failed: {_errno()}")

    def paths(self):
        """shmem_id -> ("sysv", real id, size) for map_vmas."""
        return {s.shmid: ("sysv", self.made[s.shmid], s.size) for s in self.segments if s.shmid in self.made}

    def finish(self):
        """Every segment attached: IPC_RMID again those that had it (SHM_DEST)."""
        for s in self.segments:
            if s.mode & SHM_DEST and s.shmid in self.made and s.shmid not in self.taken:
                if _libc.shmctl(self.made[s.shmid], IPC_RMID, None) < 0:
                    raise RestoreError(f"SysV segment {self.made[s.shmid]}: IPC_RMID failed: {_errno()}")
                log.info("SysV segment %d marked for removal again (IPC_RMID)", self.made[s.shmid])
        self.created.clear()

    def close(self):
        """A restore that failed: remove the segments pycr created."""
        for real in self.created:
            _libc.shmctl(real, IPC_RMID, None)
        self.created.clear()


def _is_source(row, s):
    """`pycr migrate` on one host, and row is the source's segment dumped as s: same id, key and size."""
    return (options.current().sysv_handover and row is not None and row["shmid"] == s.shmid
            and row["key"] & 0xFFFFFFFF == s.key and row["size"] == s.size)


def attach(remote, mm, vma, target, attached):
    """shmat the segment in the task at the address it had; once per attachment (its VMAs may be
    several: mprotect splits one), then the parts no dumped VMA covers are unmapped again."""
    _, real, size = target
    base = vma.start - vma.pgoff
    if (real, base) in attached:
        return
    attached.add((real, base))
    parts = [v for v in mm.vmas if is_sysv_vma(v) and v.shmem_id == vma.shmem_id and v.start - v.pgoff == base]
    writable = any(v.prot & PROT_WRITE for v in parts)
    flags = (0 if writable else SHM_RDONLY) | (SHM_EXEC if any(v.prot & PROT_EXEC for v in parts) else 0)
    got = remote.call("shmat", real, base, flags)
    if got != base:
        raise RestoreError(f"pid {remote.pid}: shmat of SysV segment {real} at {base:#x} failed: "
                           f"{os.strerror(-got) if got < 0 else hex(got)}")
    end, at = base + _rounded(size), base
    for v in sorted(parts, key=lambda v: v.start):
        if v.start > at:
            remote.check("munmap", at, v.start - at, what=f"{at:#x}, unattached part of SysV {real}")
        at = max(at, v.end)
    if at < end:
        remote.check("munmap", at, end - at, what=f"{at:#x}, unattached part of SysV {real}")
    for v in parts:
        have = PROT_EXEC * bool(flags & SHM_EXEC) | 1 | (PROT_WRITE if writable else 0)
        if v.prot != have:
            remote.check("mprotect", v.start, v.end - v.start, v.prot, what=f"{v.start:#x}, SysV {real}")
    log.info("pid %d: SysV segment %d attached at %#x with shmat", remote.pid, real, base)

