"""Reopening file descriptors at their numbers, with flags, offsets and close-on-exec.

Regular files, directories and devices are reopened by path inside the task
(never creating or truncating anything). Pipes and FIFOs cannot be reopened
by path in general, so pycr makes them itself: one pipe per dumped pipe, its
buffered bytes written back, and every task opens the end it had through
/proc/<pycr>/fd/N, which reaches the same pipe object for every process.
"""

import fcntl
import os

from pycr.errors import RestoreError
from pycr.log import log

O_ACCMODE, O_RDONLY, O_WRONLY, O_RDWR = 3, 0, 1, 2
O_CREAT, O_EXCL, O_TRUNC, O_NONBLOCK = 0o100, 0o200, 0o1000, 0o4000
O_CLOEXEC = 0o2000000
AT_FDCWD = -100
F_SETFD, FD_CLOEXEC = 2, 1
F_SETPIPE_SZ = 1031
SEEK_SET = 0
DELETED = " (deleted)"
SEEKABLE = ("reg", "dir")


class PipeHub:
    """pycr's own ends of every pipe and FIFO of the tree, for the tasks to open."""

    def __init__(self, images):
        self.ends = {}      # pipe_id -> (read fd, write fd) in pycr
        self.external = []
        for p in images.processes:
            for rec in p.fds:
                kind = str(rec.type)
                if kind not in ("pipe", "fifo") or rec.pipe_id in self.ends:
                    continue
                if kind == "pipe":
                    self._make_pipe(rec.pipe_id, images.pipes_data.get(rec.pipe_id, b""))
                else:
                    self._open_fifo(rec)

    def _make_pipe(self, pipe_id, data):
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.ends[pipe_id] = (r, w)
        if data:
            if len(data) > 65536:
                fcntl.fcntl(w, F_SETPIPE_SZ, len(data))
            view = memoryview(data)
            while view:
                view = view[os.write(w, view):]
            log.info("pipe %d: wrote back %d buffered bytes", pipe_id, len(data))

    def _open_fifo(self, rec):
        path = rec.path[: -len(DELETED)] if rec.path.endswith(DELETED) else rec.path
        try:
            # O_RDWR never blocks on a FIFO and keeps both sides open while tasks reopen it.
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise RestoreError(f"FIFO {path}: {exc.strerror}") from None
        self.ends[rec.pipe_id] = (fd, fd)

    def path(self, rec):
        r, w = self.ends[rec.pipe_id]
        end = w if (rec.flags & O_ACCMODE) == O_WRONLY else r
        return f"/proc/{os.getpid()}/fd/{end}"

    def close(self):
        for r, w in self.ends.values():
            os.close(r)
            if w != r:
                os.close(w)
        self.ends.clear()


def close_inherited(remote):
    """The stub inherited pycr's descriptors: close them all."""
    remote.check("close_range", 0, 0xFFFFFFFF, 0, what="0, ~0")


def restore_fds(remote, fds, hub):
    """Open every dumped fd of one process at its number."""
    for rec in fds:
        kind = str(rec.type)
        flags = rec.flags & ~(O_CREAT | O_EXCL | O_TRUNC | O_CLOEXEC)
        if kind in ("pipe", "fifo"):
            path = hub.path(rec)
        else:
            if rec.deleted or rec.path.endswith(DELETED):
                raise RestoreError(f"pid {remote.pid} fd {rec.fd}: {rec.path} was deleted")
            path = rec.path
        res = remote.call("openat", AT_FDCWD, remote.put_str(path), flags, 0)
        remote.reset_scratch()
        if res < 0:
            raise RestoreError(f"pid {remote.pid} fd {rec.fd}: cannot open {rec.path}: {os.strerror(-res)}")
        if res != rec.fd:
            remote.check("dup3", res, rec.fd, O_CLOEXEC if rec.cloexec else 0, what=f"{res}, {rec.fd}")
            remote.check("close", res, what=str(res))
        elif rec.cloexec:
            remote.check("fcntl", rec.fd, F_SETFD, FD_CLOEXEC, what=f"{rec.fd}, F_SETFD")
        if kind in SEEKABLE and rec.pos:
            got = remote.call("lseek", rec.fd, rec.pos, SEEK_SET)
            if got != rec.pos:
                raise RestoreError(f"pid {remote.pid} fd {rec.fd}: cannot seek {rec.path} to {rec.pos}")
    log.info("pid %d: reopened %d fds", remote.pid, len(fds))
