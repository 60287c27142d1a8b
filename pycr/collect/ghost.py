"""Files deleted while open or mapped ("ghost files"): their contents go with the images.

The path is gone, so nothing on disk can give the file back: a dump saves
every deleted regular file the tree holds once (keyed by device and inode,
however many fds and mappings reach it), as pages-ghost-<id>.img, with its
old path, mode, owner and size. Files larger than settings.ghost_limit()
are refused by name. Reads go through a new open file description
(/proc/PID/fd/N, /proc/PID/map_files): the tree's offsets stay as they are.
"""

import os
import stat

from .. import proc, settings
from ..errors import AccessDenied, Unsupported
from ..log import log
from .memory import dump_file_pages

IMAGE = "ghost"


def owner(ghost_id):
    return f"ghost-{ghost_id}"


class Ghosts:
    """The ghost files of one dump: found while fds and VMAs are read, saved once the images are written."""

    def __init__(self):
        self.by_key = {}        # (dev_major, dev_minor, inode) -> entry
        self.sources = {}       # ghost_id -> (how, pid, fd or (start, end))
        self.limit = settings.ghost_limit()

    def _entry(self, key, path, st, where, source):
        entry = self.by_key.get(key)
        if entry is None:
            if not stat.S_ISREG(st.st_mode):
                raise Unsupported(f"{where}: deleted {path} is not a regular file, which is not supported")
            if st.st_size > self.limit:
                raise Unsupported(f"{where}: deleted file {path} holds {st.st_size} bytes, more than "
                                  f"the {self.limit} bytes a dump saves (--ghost-limit, PYCR_GHOST_LIMIT)")
            entry = {"ghost_id": len(self.by_key) + 1, "dev_major": key[0], "dev_minor": key[1],
                     "inode": key[2], "path": path, "mode": st.st_mode & 0o7777, "uid": st.st_uid,
                     "gid": st.st_gid, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "file_ids": []}
            self.by_key[key] = entry
            self.sources[entry["ghost_id"]] = source
        return entry

    def add_fds(self, files_by_src):
        """Every fd record of a deleted file (describe_fd marks them `_ghost`)."""
        for src, recs in files_by_src.items():
            for rec in recs:
                dev_ino = rec.pop("_ghost", None)
                if dev_ino is None:
                    continue
                dev, ino = dev_ino
                st = proc.stat_fd(src, rec["fd"])
                entry = self._entry((os.major(dev), os.minor(dev), ino), rec["path"], st,
                                    f"pid {src} fd {rec['fd']}", ("fd", src, rec["fd"]))
                if rec["file_id"] not in entry["file_ids"]:
                    entry["file_ids"].append(rec["file_id"])

    def add_vmas(self, vmas_by_src):
        """Every file mapping whose file was deleted (memfds are no ghosts: collect/memfd.py)."""
        for src, vmas in vmas_by_src.items():
            for vma, *_ in vmas:
                if vma.kind != "file" or not vma.deleted or vma.is_memfd:
                    continue
                key = (vma.dev_major, vma.dev_minor, vma.inode)
                if key in self.by_key:
                    continue
                fd = _open_map_file(src, vma)
                try:
                    st = os.fstat(fd)
                finally:
                    os.close(fd)
                self._entry(key, vma.path, st, f"pid {src}: mapping {vma.start:#x}-{vma.end:#x}",
                            ("map", src, (vma.start, vma.end)))

    def body(self):
        return {"ghosts": list(self.by_key.values())} if self.by_key else None

    def dump_contents(self, imgdir):
        """pages-ghost-<id>.img of every ghost file; returns bytes written."""
        written = 0
        for entry in self.by_key.values():
            how, src, where = self.sources[entry["ghost_id"]]
            if how == "fd":
                fd = proc.open_fd(src, where, os.O_RDONLY | os.O_CLOEXEC)
            else:
                fd = proc.open_map_file(src, *where)
            try:
                written += dump_file_pages(fd, entry["size"], owner(entry["ghost_id"]), imgdir)
            finally:
                os.close(fd)
            log.info("deleted file %s: %d bytes saved with the images", entry["path"], entry["size"])
        return written


def _open_map_file(src, vma):
    try:
        return proc.open_map_file(src, vma.start, vma.end)
    except AccessDenied:
        raise AccessDenied(f"pid {src}: mapping {vma.start:#x} of deleted file {vma.path}: reading it through "
                           "/proc/PID/map_files needs CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN") from None
