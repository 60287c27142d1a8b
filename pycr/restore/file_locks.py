"""File locks taken again inside the restored tasks (file-locks.img, --file-locks).

Regular files are not a kind of their own (restore/kinds.py), so this is not
an `in_task` hook but a step of its own in Restore.finish_process, run once a
process's fds are in place: a POSIX lock is dropped by any close() of its owner
on that file, and restore_fds closes the fds pidfd_getfd gave at other numbers.
Each lock is taken with the non-blocking call: EAGAIN means a process outside
the tree holds a conflicting lock now, and the restore stops naming it.
"""

import errno
import os
import struct

from pycr import proc
from pycr.abi import F_OFD_SETLK, F_RDLCK, F_SETLK, F_WRLCK, LOCK_EX, LOCK_NB, LOCK_SH, SEEK_SET
from pycr.errors import ImageError, RestoreError
from pycr.log import log

FLOCK = struct.Struct("<hhxxxxqqi4x")   # struct flock: l_type, l_whence, l_start, l_len, l_pid
OFFSET_MAX = 2**63 - 1
CLASS = {"posix": "POSIX", "flock": "FLOCK", "ofd": "OFDLCK"}


def check(path, body, processes):
    """Each lock names a process of the set, one of its fds, that fd's description, a sane range."""
    fds = {p.pid: {rec.fd: rec for rec in p.fds} for p in processes}
    for lock in body.locks:
        what = f"{lock.kind} lock of pid {lock.pid} fd {lock.fd}"
        rec = fds.get(lock.pid, {}).get(lock.fd)
        if rec is None or rec.file_id != lock.file_id:
            raise ImageError(path, f"corrupt: {what}: no such fd of that process with file_id {lock.file_id}")
        if lock.start > OFFSET_MAX or lock.length > OFFSET_MAX - lock.start:
            raise ImageError(path, f"corrupt: {what}: range {lock.start}+{lock.length} is past 2^63")
        if str(lock.kind) == "flock" and (lock.start or lock.length):
            raise ImageError(path, f"corrupt: {what}: a flock lock has no range")


def _describe(lock, path):
    rng = "" if str(lock.kind) == "flock" else \
        f" bytes {lock.start}..{'EOF' if not lock.length else lock.start + lock.length - 1}"
    return f"{CLASS[str(lock.kind)]} {'write' if lock.write else 'read'} lock on {path}{rng}"


def _holders(fd, reals):
    """Pids outside the tree (reals: its real pids) with a lock on the file behind pycr's fd."""
    st = os.fstat(fd)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    out = []
    for lock, ldev, ino in proc.system_locks():
        if ldev == dev and ino == st.st_ino and lock.pid not in reals:
            out.append(f"{lock.cls} {lock.access.lower()} lock of " + ("an open file description" if lock.pid < 0
                                                                        else f"pid {lock.pid}"))
    return out


def take(remote, pid, locks, fds, descs, reals=()):
    """Take every lock of process pid again through its restored fds.

    fds: its fd records (for the path in messages); descs: files.Descriptions
    (pycr's fd of each description, to name a holder); reals: the tree's real pids.
    """
    by_fd = {rec.fd: rec for rec in fds}
    for lock in locks:
        rec = by_fd[lock.fd]
        kind = str(lock.kind)
        if kind == "flock":
            res = remote.call("flock", lock.fd, (LOCK_EX if lock.write else LOCK_SH) | LOCK_NB)
        else:
            arg = remote.put(FLOCK.pack(F_WRLCK if lock.write else F_RDLCK, SEEK_SET, lock.start, lock.length, 0))
            res = remote.call("fcntl", lock.fd, F_SETLK if kind == "posix" else F_OFD_SETLK, arg)
            remote.reset_scratch()
        if res < 0:
            why = os.strerror(-res)
            if -res in (errno.EAGAIN, errno.EDEADLK):
                held = _holders(descs.fd_for(pid, rec, remote), set(reals))
                why = "held now by a process outside the tree" + (f" ({'; '.join(held)})" if held else "")
            raise RestoreError(f"pid {pid} fd {lock.fd}: cannot take its {_describe(lock, rec.path)} again: {why}")
        log.info("pid %d fd %d: %s taken again", pid, lock.fd, _describe(lock, rec.path))
