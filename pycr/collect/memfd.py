"""memfd: a file in memory (memfd_create) held by fds or mapped: its name, size, seals, contents.

A memfd is one object however the tree reaches it: fds (one entry per open
file description, by file_id) and mappings (shared: kind shmem; private: kind
file) carry the same shmem_id, its inode. Its pages are saved once, as
pages-shmem-<id>.img, like shared anonymous memory (collect/memory.py); a
memfd only mapped is found through /proc/PID/map_files. Every read goes
through a new open file description, never the tree's: lseek(SEEK_DATA)
would move a shared offset.
"""

import fcntl
import os
import stat

from .. import proc
from ..abi import F_GET_SEALS
from ..errors import AccessDenied
from ..log import log
from .memory import dump_file_pages

TYPE = "memfd"
IMAGE = "memfd"
PREFIX = "/memfd:"
DELETED = " (deleted)"


def matches(pid, fd, target, st):
    return target.startswith(PREFIX) and stat.S_ISREG(st.st_mode)


def name_of(path):
    """NAME of "/memfd:NAME (deleted)"."""
    return path[len(PREFIX):].removesuffix(DELETED)


def _describe(fd, path):
    st = os.fstat(fd)
    try:
        seals = fcntl.fcntl(fd, F_GET_SEALS)
    except OSError:
        seals = 0
    return {"shmem_id": st.st_ino, "name": name_of(path), "size": st.st_size, "seals": seals,
            "mode": stat.S_IMODE(st.st_mode), "file_ids": []}


def collect(objects):
    """One entry per memfd inode, with the descriptions (file_ids) that hold it."""
    by_ino = {}
    for held in objects:
        fd = proc.open_fd(held.pid, held.fd, os.O_RDONLY | os.O_CLOEXEC)
        try:
            entry = _describe(fd, held.rec["path"])
        finally:
            os.close(fd)
        entry = by_ino.setdefault(entry["shmem_id"], entry)
        entry["file_ids"].append(held.file_id)
    return {"memfds": list(by_ino.values())}


def add_mapped(bodies, vmas_by_src):
    """Add to the memfd image every memfd the tree maps without holding an fd of it.

    vmas_by_src: {pid to read /proc from: [(proc.Vma, vmflags, pkey)]}.
    """
    body = bodies.get(IMAGE) or {"memfds": []}
    have = {e["shmem_id"] for e in body["memfds"]}
    for src, vmas in vmas_by_src.items():
        for vma, *_ in vmas:
            if not vma.is_memfd or vma.inode in have:
                continue
            try:
                fd = proc.open_map_file(src, vma.start, vma.end)
            except AccessDenied:
                raise AccessDenied(f"pid {src}: memfd mapping at {vma.start:#x}: reading it through "
                                   "/proc/PID/map_files needs CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN") from None
            try:
                body["memfds"].append(_describe(fd, vma.path))
            finally:
                os.close(fd)
            have.add(vma.inode)
    if body["memfds"]:
        bodies[IMAGE] = body
        log.info("%d memfd(s): name, size and seals read (F_GET_SEALS)", len(body["memfds"]))


def dump_contents(body, files_by_src, imgdir):
    """pages-shmem-<id> of every memfd no mapping saved already; returns bytes written."""
    if not body:
        return 0
    holders = {}
    for src, recs in files_by_src.items():
        for rec in recs:
            if rec["type"] == TYPE:
                holders.setdefault(rec["file_id"], (src, rec["fd"]))
    written = 0
    for entry in body["memfds"]:
        owner = f"shmem-{entry['shmem_id']}"
        if imgdir.exists("pagemap", owner):
            continue
        src, fd_nr = holders[entry["file_ids"][0]]
        fd = proc.open_fd(src, fd_nr, os.O_RDONLY | os.O_CLOEXEC)
        try:
            written += dump_file_pages(fd, entry["size"], owner, imgdir)
        finally:
            os.close(fd)
    return written
