"""File descriptors at their numbers, sharing open file descriptions as dumped.

pycr opens every open file description of the tree once (files by path, never
creating or truncating; pipes it makes itself and refills; FIFOs it holds
open), positioned at the dumped offset. Each task then pulls the ones it had
with an injected pidfd_getfd through a pidfd of pycr that every stub
inherited, and dup3()s them to their numbers. Fds that shared a description
(after dup or fork, same file_id) share it again, offset and flags included.
"""

import fcntl
import os
import re
import struct
import termios

from pycr.abi import (F_DUPFD_CLOEXEC, F_GETPIPE_SZ, F_SETFD, F_SETPIPE_SZ, O_ACCMODE, O_CLOEXEC, O_CREAT,
                      O_EXCL, O_NOFOLLOW, O_TMPFILE, O_TRUNC, O_WRONLY)
from pycr import options
from pycr.errors import RestoreError
from pycr.log import log
from pycr.restore import ghost, kinds

DELETED = " (deleted)"
SEEKABLE = ("reg", "dir")


PROC_PID = re.compile(r"^/proc/(\d+)(/.*)?$")


def tree_proc_pid(path, tree_pids):
    """The PID of the tree that a /proc/PID[/...] path names (as /proc/self resolves), else None."""
    m = PROC_PID.match(path)
    if m and int(m.group(1)) in tree_pids:
        return int(m.group(1))
    return None


class Descriptions:
    """Every open file description of the tree, opened once by pycr, keyed by file_id.

    Pipes are made by pycr (their buffered bytes written back) and FIFOs held
    open read-write, so that opening a descriptor of either never blocks.
    A file under /proc/PID of a task of the tree (/proc/self/status opened by
    the task) exists only once that task does: it is opened when first
    handed to a task, with PID as the restored task's real one (`reals`).
    """

    def __init__(self, images):
        self.fds = {}           # description key -> fd in pycr
        self.pipes = {}         # pipe_id -> (read fd, write fd) in pycr
        self.late = {}          # description key -> record, opened once the tasks exist
        self.reals = {}         # dumped pid -> real pid, where they differ (--pidns)
        self.images = images
        self.objects = kinds.KindObjects(images)
        tree_pids = {tid for p in images.processes for tid in p.tids}
        try:
            for p in images.processes:
                for rec in p.fds:
                    key = self.key(p.pid, rec)
                    if key in self.fds or key in self.late:
                        continue
                    if str(rec.type) in SEEKABLE and tree_proc_pid(rec.path, tree_pids) is not None:
                        self.late[key] = rec
                    else:
                        self.fds[key] = self._open(rec, images)
        except BaseException:
            self.close()
            raise

    def fd_for(self, pid, rec, remote=None):
        """pycr's fd of the description behind rec (an fd of process pid)."""
        key = self.key(pid, rec)
        if key not in self.fds:
            late = self.late.pop(key)
            m = PROC_PID.match(late.path)
            named = int(m.group(1))
            real = self.reals.get(named, remote.real if remote is not None and named == remote.pid else named)
            path = f"/proc/{real}{m.group(2) or ''}"
            self.fds[key] = self._open(late, self.images, path)
            log.info("pid %d fd %d: %s opened as %s once the task exists", pid, rec.fd, late.path, path)
        return self.fds[key]

    @staticmethod
    def key(pid, rec):
        """file_id names a description across the tree; without one, each fd is its own."""
        return rec.file_id if getattr(rec, "file_id", 0) else (pid, rec.fd)

    def _open(self, rec, images, path=None):
        kind = str(rec.type)
        if kind in kinds.TYPES:
            return self.objects.open(rec)
        flags = (rec.flags & ~(O_CREAT | O_EXCL | O_TRUNC)) | O_CLOEXEC | os.O_NOCTTY
        inherited = None
        if kind == "pipe":
            inherited = inherited_fd(rec)
            path = self._pipe_path(rec, images, inherited)
            if inherited is not None:       # an open for writing waits for a reader: never here
                flags |= os.O_NONBLOCK
        elif kind == "fifo":
            path = self._fifo_path(rec, images)
        elif path is None:
            if kind == "reg" and rec.deleted:
                path = ghost.holder(images).path_for_file(rec.file_id)     # made again, unlinked
                # An O_TMPFILE file keeps O_TMPFILE (and O_DIRECTORY) in its flags; the holder
                # is reached through a /proc magic link, which O_NOFOLLOW would refuse.
                flags &= ~(O_TMPFILE | O_NOFOLLOW)
            elif rec.deleted or rec.path.endswith(DELETED):
                raise RestoreError(f"fd {rec.fd}: {rec.path} was deleted")
            else:
                path = rec.path
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            if inherited is not None:
                raise RestoreError(f"{rec.path}: the pipe of pycr's fd {inherited} (--inherit-fd): "
                                   f"{exc.strerror} (no reader left?)") from None
            raise RestoreError(f"cannot open {rec.path}: {exc.strerror}") from None
        if inherited is not None and not rec.flags & os.O_NONBLOCK:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        if kind in SEEKABLE and rec.pos:
            try:
                os.lseek(fd, rec.pos, os.SEEK_SET)
            except OSError as exc:
                os.close(fd)
                raise RestoreError(f"cannot seek {rec.path} to {rec.pos}: {exc.strerror}") from None
        return fd

    def _pipe_path(self, rec, images, inherited=None):
        if inherited is not None:
            return self._inherited_pipe_path(rec, images, inherited)
        if rec.pipe_id not in self.pipes:
            r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            self.pipes[rec.pipe_id] = (r, w)
            refill(w, rec.pipe_id, images)
        r, w = self.pipes[rec.pipe_id]
        return f"/proc/self/fd/{w if (rec.flags & O_ACCMODE) == O_WRONLY else r}"

    def _inherited_pipe_path(self, rec, images, fd):
        """--inherit-fd: the tree's ends of this pipe are opened on pycr's pipe `fd` (each end by its
        own mode, through /proc/self/fd); the bytes the dump found buffered go into it if it can be
        written, as the old reader had not read them."""
        if rec.pipe_id not in self.pipes:
            mine = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
            self.pipes[rec.pipe_id] = (mine, mine)
            if fcntl.fcntl(mine, fcntl.F_GETFL) & O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
                refill(mine, rec.pipe_id, images)
            elif images.pipes_data.get(rec.pipe_id):
                log.warning("pipe:[%d]: %d buffered bytes of the dump are not written back: pycr's fd %d is "
                            "its read end", rec.pipe_id, len(images.pipes_data[rec.pipe_id]), fd)
            log.info("pipe:[%d]: the tree's ends are opened on pycr's fd %d (--inherit-fd)", rec.pipe_id, fd)
        return f"/proc/self/fd/{self.pipes[rec.pipe_id][0]}"

    def _fifo_path(self, rec, images):
        if rec.pipe_id not in self.pipes:
            path = rec.path[: -len(DELETED)] if rec.path.endswith(DELETED) else rec.path
            try:
                # O_RDWR never blocks on a FIFO and keeps both sides open while fds are made.
                fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                raise RestoreError(f"FIFO {path}: {exc.strerror}") from None
            self.pipes[rec.pipe_id] = (fd, fd)
            refill(fd, rec.pipe_id, images, f"FIFO {path}")
        return f"/proc/self/fd/{self.pipes[rec.pipe_id][0]}"

    def close(self):
        for fd in self.fds.values():
            os.close(fd)
        for r, w in self.pipes.values():
            os.close(r)
            if w != r:
                os.close(w)
        self.fds.clear()
        self.pipes.clear()
        self.objects.close()


def inherited_fd(rec):
    """pycr's fd that --inherit-fd gives the pipe of rec, or None."""
    return dict(options.current().inherit_fds).get(f"pipe:[{rec.pipe_id}]")


def refill(fd, pipe_id, images, what=None):
    """Give a pipe (or FIFO) its dumped size, then write back its buffered bytes.

    The size goes first: the bytes may not fit a default pipe, and a writer
    must find the pipe as full as it was (no more room, no less).
    """
    what = what or f"pipe:[{pipe_id}]"
    data = images.pipes_data.get(pipe_id, b"")
    size = images.pipe_sizes.get(pipe_id, 0)
    if size and fcntl.fcntl(fd, F_GETPIPE_SZ) != size:
        try:
            fcntl.fcntl(fd, F_SETPIPE_SZ, size)
        except OSError as exc:
            raise RestoreError(f"{what}: cannot set its size back to {size} bytes: {exc.strerror}") from None
    if _buffered(fd):
        raise RestoreError(f"{what}: holds data already; another process has it open")
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except BlockingIOError:
        raise RestoreError(f"{what}: {len(data)} buffered bytes do not fit its {fcntl.fcntl(fd, F_GETPIPE_SZ)} "
                           "bytes") from None
    if data:
        log.info("%s: wrote back %d buffered bytes (pipe size %d)", what, len(data), size)


def _buffered(fd):
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]


def pycr_pidfd():
    """A pidfd of pycr without close-on-exec: every stub inherits it at this number,
    and pulls the descriptions pycr opened with pidfd_getfd through it."""
    from pycr.native import core
    fd = core.pidfd_open(os.getpid())
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD, 3)
    finally:
        os.close(fd)


def close_inherited(remote, keep):
    """The stub inherited pycr's descriptors: close all but the pidfd `keep`."""
    if keep > 0:
        remote.check("close_range", 0, keep - 1, 0, what=f"0, {keep - 1}")
    remote.check("close_range", keep + 1, 0xFFFFFFFF, 0, what=f"{keep + 1}, ~0")


def restore_fds(remote, pid, fds, descs, pidfd):
    """Give every dumped fd of one process its description, at its number.

    The task pulls each description from pycr with pidfd_getfd, so fds that
    shared one (dup, fork) share it again: offset and status flags included.
    Finally the task's pidfd of pycr is closed.
    """
    top = max([rec.fd for rec in fds] + [pidfd]) + 1
    if any(rec.fd == pidfd for rec in fds):
        moved = remote.check("fcntl", pidfd, F_DUPFD_CLOEXEC, top, what=f"{pidfd}, F_DUPFD_CLOEXEC")
        remote.check("close", pidfd, what=str(pidfd))
        pidfd = moved
    for rec in fds:
        mine = descs.fd_for(pid, rec, remote)
        got = remote.call("pidfd_getfd", pidfd, mine, 0)
        if got < 0:
            raise RestoreError(f"pid {remote.pid} fd {rec.fd}: pidfd_getfd failed: {os.strerror(-got)}")
        if got != rec.fd:
            remote.check("dup3", got, rec.fd, O_CLOEXEC if rec.cloexec else 0, what=f"{got}, {rec.fd}")
            remote.check("close", got, what=str(got))
        elif not rec.cloexec:
            remote.check("fcntl", rec.fd, F_SETFD, 0, what=f"{rec.fd}, F_SETFD")
    remote.check("close", pidfd, what=str(pidfd))
    descs.objects.in_task(remote, pid, fds)
    log.info("pid %d: %d fds taken from pycr with pidfd_getfd", remote.pid, len(fds))
