"""memfd and shared anonymous memory: one memfd of pycr per dumped object, for fds and mappings alike.

`SharedMemory` (one per restore, `shared(images)`) makes every shared object
before any task maps it: a memfd with the dumped name, size, mode and pages
(plain shared anonymous memory too, which the kernel cannot make again
otherwise). Mappings open it through /proc/<pycr>/fd/N, fds reopen it there
with their own flags and offset: an fd and a mapping of one memfd are one
file again. Seals go on last (`seal()`), once every task has mapped what it
had: F_SEAL_FUTURE_WRITE would refuse a writable shared mapping made after it.
SysV segments are not memfds: restore/sysvshm.py makes them.
"""

import fcntl
import os

from pycr.abi import F_ADD_SEALS, F_SEALS_ALL, MFD_ALLOW_SEALING, MFD_CLOEXEC, O_CLOEXEC, O_CREAT, O_EXCL, O_TRUNC
from pycr.errors import ImageError, RestoreError
from pycr.log import log
from pycr.restore.kindparts import entries_by_file

TYPE = "memfd"
IMAGE = "memfd"
NAME_MAX = 249                  # memfd_create: 255 bytes with the "memfd:" prefix and NUL
SIZE_MAX = 1 << 46


def check(path, body, recs):
    ids = set()
    for e in body.memfds:
        if e.shmem_id in ids:
            raise ImageError(path, f"corrupt: memfd {e.shmem_id} is listed twice")
        if e.seals & ~F_SEALS_ALL or e.mode > 0o7777 or e.size > SIZE_MAX or len(os.fsencode(e.name)) > NAME_MAX:
            raise ImageError(path, f"corrupt: memfd {e.shmem_id} has seals {e.seals:#x}, mode {e.mode:o}, "
                                   f"size {e.size} or a name longer than {NAME_MAX} bytes")
        ids.add(e.shmem_id)
    entries_by_file(path, body.memfds, recs, "memfd", file_ids=lambda e: e.file_ids)


def shared(images):
    """The SharedMemory of this restore (made at the first call)."""
    return images.holder("memfd", SharedMemory)


class SharedMemory:
    """pycr's memfd of every shared object of the tree, keyed by shmem_id."""

    def __init__(self, images):
        self.fds = {}               # shmem_id -> fd in pycr
        self._read(images)

    def _read(self, images):
        self.images = images
        body = images.objects.get(IMAGE)
        self.memfds = {e.shmem_id: e for e in body.memfds} if body else {}
        sysv = images.objects.get("sysvshm")
        self.sysv = {s.shmid for s in sysv.segments} if sysv else set()

    def _wanted(self):
        return (set(self.images.shmem) | set(self.memfds)) - self.sysv

    def make_all(self):
        for shmem_id in self._wanted():
            self.fd(shmem_id)

    def refresh(self, images):
        """An incremental restore's next pass: the same memfds, emptied and filled with its
        contents (the replica's mappings see them at once), new objects made."""
        self._read(images)
        for shmem_id in self._wanted():
            if shmem_id in self.fds:
                fd = self.fds[shmem_id]
                os.ftruncate(fd, 0)             # pages the object no longer has read as zeros
                self._fill(fd, shmem_id)
                log.info("shared object %d: memfd refilled from this pass", shmem_id)
            else:
                self.fd(shmem_id)

    @property
    def paths(self):
        """shmem_id -> a path a restored task can open to map the object."""
        return {sid: f"/proc/{os.getpid()}/fd/{fd}" for sid, fd in self.fds.items()}

    def fd(self, shmem_id):
        if shmem_id not in self.fds:
            self.fds[shmem_id] = self._make(shmem_id)
        return self.fds[shmem_id]

    def _make(self, shmem_id):
        entry = self.memfds.get(shmem_id)
        name = entry.name if entry else self._mapped_name(shmem_id)
        fd = os.memfd_create(name, MFD_CLOEXEC | (MFD_ALLOW_SEALING if entry else 0))
        try:
            self._fill(fd, shmem_id)
        except BaseException:
            os.close(fd)
            raise
        log.info("shared object %d: memfd %r of %d bytes made and filled", shmem_id, name, os.fstat(fd).st_size)
        return fd

    def _fill(self, fd, shmem_id):
        entry = self.memfds.get(shmem_id)
        size = entry.size if entry else self.images.shmem[shmem_id]
        os.ftruncate(fd, size)
        self.images.pages.fill_fd(fd, f"shmem-{shmem_id}")
        os.ftruncate(fd, size)              # the last saved page may reach past the end
        if entry:
            os.fchmod(fd, entry.mode)

    def _mapped_name(self, shmem_id):
        for p in self.images.processes:
            for vma in p.mm.vmas:
                if str(vma.kind) == "shmem" and vma.shmem_id == shmem_id and vma.path.startswith("/memfd:"):
                    return vma.path[len("/memfd:"):].removesuffix(" (deleted)")
        return "pycr-shmem"

    def seal(self):
        """F_ADD_SEALS with the dumped seals, after the contents and every mapping."""
        for shmem_id, entry in self.memfds.items():
            if entry.seals and shmem_id in self.fds:
                try:
                    fcntl.fcntl(self.fds[shmem_id], F_ADD_SEALS, entry.seals)
                except OSError as exc:
                    raise RestoreError(f"memfd {entry.name}: F_ADD_SEALS {entry.seals:#x} failed: "
                                       f"{exc.strerror}") from None
                log.info("memfd %r: seals %#x added", entry.name, entry.seals)

    def close(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


class Objects:
    """The fds of memfds: each description reopens pycr's memfd with its own flags and offset."""

    def __init__(self, images, body):
        self.shared = shared(images)
        self.images = images
        self.by_file = {fid: e for e in body.memfds for fid in e.file_ids}

    def open(self, rec):
        entry = self.by_file[rec.file_id]
        mine = self.shared.fd(entry.shmem_id)
        flags = (rec.flags & ~(O_CREAT | O_EXCL | O_TRUNC)) | O_CLOEXEC
        try:
            fd = os.open(f"/proc/self/fd/{mine}", flags)
        except OSError as exc:
            raise RestoreError(f"fd {rec.fd}: cannot reopen memfd {entry.name}: {exc.strerror}") from None
        if rec.pos:
            os.lseek(fd, rec.pos, os.SEEK_SET)
        return fd

    def close(self):
        pass
