"""Files deleted while open or mapped: made again at their old path, opened, then unlinked.

pycr creates each ghost file at the path it had (beside it, under a new
name, if that path is taken now), writes its saved contents, gives it its
size, mode and owner, opens it once and unlinks it at once. Fds reopen
/proc/<pycr>/fd/N with their own flags, mappings open that path: the kernel
then shows "PATH (deleted)" again, and every holder has the one inode.
"""

import os

from pycr.errors import ImageError, RestoreError
from pycr.log import log

IMAGE = "ghost"
SIZE_MAX = 1 << 46


def owner(ghost_id):
    return f"ghost-{ghost_id}"


def check(path, body, fds_by_pid, processes):
    """Ghost entries sane; every deleted fd and deleted file mapping has one."""
    file_ids, keys, ids = set(), set(), set()
    for g in body.ghosts if body else ():
        key = (g.dev_major, g.dev_minor, g.inode)
        if g.ghost_id in ids or key in keys or g.mode > 0o7777 or g.size > SIZE_MAX or not g.path.startswith("/"):
            raise ImageError(path, f"corrupt: ghost file {g.ghost_id} ({g.path}) is listed twice or has "
                                   f"mode {g.mode:o}, size {g.size} or a relative path")
        ids.add(g.ghost_id)
        keys.add(key)
        file_ids.update(g.file_ids)
    for pid, recs in fds_by_pid.items():
        for rec in recs:
            if str(rec.type) == "reg" and rec.deleted and rec.file_id not in file_ids:
                raise ImageError(path, f"corrupt: pid {pid} fd {rec.fd}: deleted file {rec.path} has no ghost entry")
    for p in processes:
        for vma in p.mm.vmas:
            if is_ghost_vma(vma) and (vma.dev_major, vma.dev_minor, vma.inode) not in keys:
                raise ImageError(path, f"corrupt: pid {p.pid}: mapping {vma.start:#x} of deleted file "
                                       f"{vma.path} has no ghost entry")


def is_ghost_vma(vma):
    return str(vma.kind) == "file" and vma.path.endswith(" (deleted)") and not vma.path.startswith("/memfd:")


def vma_key(vma):
    """The key of a ghost mapping in the paths map_vmas gets (beside shmem ids)."""
    return ("ghost", vma.dev_major, vma.dev_minor, vma.inode)


def holder(images):
    """The GhostFiles of this restore (made at the first call)."""
    return images.holder("ghost", GhostFiles)


def entry_key(g):
    """A ghost file's identity, the same in every pass of a chain (its ghost_id need not be)."""
    return ("ghost", g.dev_major, g.dev_minor, g.inode)


class GhostFiles:
    def __init__(self, images):
        self.fds = {}           # entry_key -> fd in pycr (O_RDWR, the file unlinked)
        self._read(images)

    def _read(self, images):
        self.images = images
        body = images.objects.get(IMAGE)
        self.entries = list(body.ghosts) if body else []
        self.by_file = {fid: g for g in self.entries for fid in g.file_ids}

    def fd(self, g):
        key = entry_key(g)
        if key not in self.fds:
            self.fds[key] = self._make(g)
        return self.fds[key]

    def refresh(self, images):
        """An incremental restore's next pass: the same files, emptied and filled with its
        contents (the replica's mappings see them at once), new ones made."""
        self._read(images)
        for g in self.entries:
            fd = self.fds.get(entry_key(g))
            if fd is None:
                self.fd(g)
                continue
            os.ftruncate(fd, 0)
            self._fill(fd, g)
            log.info("deleted file %s: refilled from this pass, %d bytes", g.path, g.size)

    def _make(self, g):
        path, n = g.path, 0
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
                break
            except FileExistsError:
                n += 1
                path = f"{g.path}.pycr-ghost-{n}"
            except OSError as exc:
                raise RestoreError(f"deleted file {g.path}: cannot create it again: {exc.strerror}") from None
        try:
            try:
                self._fill(fd, g)
            finally:
                os.unlink(path)
        except BaseException:
            os.close(fd)
            raise
        log.info("deleted file %s: made again as %s with %d bytes, opened, unlinked", g.path, path, g.size)
        return fd

    def _fill(self, fd, g):
        self.images.pages.fill_fd(fd, owner(g.ghost_id))
        os.ftruncate(fd, g.size)
        try:
            os.fchown(fd, g.uid, g.gid)
        except PermissionError:
            log.warning("deleted file %s: owner %d:%d not given back (no CAP_CHOWN)", g.path, g.uid, g.gid)
        os.fchmod(fd, g.mode)
        os.utime(fd, ns=(g.mtime_ns, g.mtime_ns))

    def path_for_file(self, file_id):
        """A path to reopen the ghost file of an fd (its description's file_id)."""
        return f"/proc/{os.getpid()}/fd/{self.fd(self.by_file[file_id])}"

    def paths(self):
        """vma_key -> a path a task opens to map a ghost file; every ghost is made here."""
        return {entry_key(g): f"/proc/{os.getpid()}/fd/{self.fd(g)}" for g in self.entries}

    def close(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
