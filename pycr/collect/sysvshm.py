"""SysV shared memory: the segments the tree has attached, from /proc/sysvipc/shm.

An attachment is a shared mapping "/SYSV<key> (deleted)" whose inode is the
segment's id (kind shmem, shmem_id = the id); its pages are saved once like
any shared object (collect/memory.py). This module adds what only the IPC
namespace knows: key, mode (with SHM_DEST once IPC_RMID was asked while
attached), owner, creator and size. A segment pycr cannot see in
/proc/sysvipc/shm (another IPC namespace) is refused by name.
"""

from .. import proc
from ..errors import Unsupported
from ..log import log

IMAGE = "sysvshm"


def collect(vmas_by_src):
    """The sysvshm image body for every segment the tree maps, or None if it maps none."""
    table = None
    segments = {}
    for src, vmas in vmas_by_src.items():
        for vma, *_ in vmas:
            if vma.kind != "shmem" or not vma.is_sysv or vma.inode in segments:
                continue
            if table is None:
                table = proc.sysv_shm()
            row = table.get(vma.inode)
            if row is None:
                raise Unsupported(f"pid {src}: SysV shared memory at {vma.start:#x} (id {vma.inode}) is not "
                                  "in /proc/sysvipc/shm: another IPC namespace is not supported")
            segments[vma.inode] = {"shmid": row["shmid"], "key": row["key"] & 0xFFFFFFFF, "mode": row["perms"],
                                   "size": row["size"], "uid": row["uid"], "gid": row["gid"],
                                   "cuid": row["cuid"], "cgid": row["cgid"]}
    if not segments:
        return None
    log.info("%d SysV shared memory segment(s) read from /proc/sysvipc/shm", len(segments))
    return {"segments": list(segments.values())}
