"""Open file descriptors: what each one is, its flags and position; pipe contents.

A pipe's buffered bytes are copied without consuming them: pycr opens the
pipe's read side through /proc/PID/fd/N (this works from either end) and
tee(2)s it into a pipe of its own, which is then read.
"""

import errno
import fcntl
import os
import socket
import stat as st
import struct
import termios

from .. import abi, proc, sysinfo
from . import kinds
from ..abi import F_GETPIPE_SZ, F_SETPIPE_SZ, O_CLOEXEC, SPLICE_F_NONBLOCK
from ..errors import AccessDenied, Unsupported, TaskGone
from ..native import core

FAMILY_NAMES = {getattr(socket, n): n for n in dir(socket) if n.startswith("AF_") and n != "AF_ROUTE"}


def _socket_family(pid, fd):
    """The AF_* name of a socket fd of another process (for the refusal message)."""
    try:
        mine = core.dup_from(pid, fd)
        sock = socket.socket(fileno=mine)   # owns mine from here on
        try:
            return FAMILY_NAMES.get(sock.family, str(int(sock.family)))
        finally:
            sock.close()
    except OSError:
        return "unknown family"


def _is_tty(pid, fd, rdev):
    """Ask the kernel: isatty() on a copy of the fd; by /proc/devices majors if no copy can be had."""
    try:
        mine = core.dup_from(pid, fd)
    except OSError:
        return os.major(rdev) in sysinfo.tty_majors()
    try:
        return os.isatty(mine)
    finally:
        os.close(mine)


def describe_fd(pid, fd, target):
    """One fd record of the files image; raises Unsupported for what pycr cannot restore."""
    info = proc.fdinfo(pid, fd)
    try:
        s = proc.stat_fd(pid, fd)
    except TaskGone:
        raise TaskGone(pid, f"fd {fd} closed while frozen") from None
    rec = {"fd": fd, "type": "reg", "flags": info.flags & ~O_CLOEXEC, "pos": info.pos,
           "cloexec": bool(info.flags & O_CLOEXEC), "path": target, "deleted": False,
           "pipe_id": 0, "rdev": 0, "size": 0, "file_id": 0,
           "_same_file": (s.st_dev, s.st_ino, info.flags & ~O_CLOEXEC, info.pos)}   # close-on-exec is the fd's, not the description's
    mode = s.st_mode
    kind, type_name = kinds.kind_of(pid, fd, target, s)
    if kind is not None:
        rec["type"] = type_name
    elif st.S_ISREG(mode):
        rec["size"] = s.st_size
        if target.endswith(" (deleted)"):
            # a ghost file: its contents go with the images (collect/ghost.py)
            rec.update(path=target[:-len(" (deleted)")], deleted=True, _ghost=(s.st_dev, s.st_ino))
    elif st.S_ISDIR(mode):
        rec["type"] = "dir"
    elif st.S_ISFIFO(mode):
        if target.startswith("pipe:["):
            rec.update(type="pipe", pipe_id=s.st_ino, path="")
        else:
            rec.update(type="fifo", pipe_id=s.st_ino)
    elif st.S_ISCHR(mode):
        rec["rdev"] = s.st_rdev
        rec["type"] = "tty" if _is_tty(pid, fd, s.st_rdev) else "chr"
    elif st.S_ISSOCK(mode):
        fam = _socket_family(pid, fd)
        raise Unsupported(f"pid {pid} fd {fd}: socket ({fam}) is not supported")
    else:
        what = target[len("anon_inode:"):] if target.startswith("anon_inode:") else target
        raise Unsupported(f"pid {pid} fd {fd}: {what} is not supported")
    return rec


def collect_files(pid):
    """Records of every fd of process pid, in fd order."""
    return [describe_fd(pid, fd, target) for fd, target in proc.fds(pid).items()]


def number_file_descriptions(files_by_pid):
    """Give fds that share one open file description (after dup or fork) the same file_id.

    Sharing is asked of the kernel with kcmp(KCMP_FILE), only between fds that
    could share: same file, flags and offset. The restorer then opens each
    description once and hands it to every fd that had it, so offsets stay shared.
    """
    seen = {}      # (dev, ino, flags, pos) -> [(pid, record)] of distinct descriptions
    next_id = 1
    for pid, recs in files_by_pid.items():
        for rec in recs:
            candidates = seen.setdefault(rec.pop("_same_file"), [])
            for other_pid, other in candidates:
                if core.kcmp(pid, other_pid, abi.KCMP_FILE, rec["fd"], other["fd"]) == 0:
                    rec["file_id"] = other["file_id"]
                    break
            else:
                rec["file_id"] = next_id
                next_id += 1
                candidates.append((pid, rec))


def peek_pipe(pid, fd):
    """(buffered bytes, pipe size) of the pipe behind pid's fd; the bytes are left in place.

    They are tee(2)d into a pipe of pycr's as large as the source: if that
    pipe cannot be made as large (pipe-max-size without CAP_SYS_RESOURCE),
    or tee copies less than FIONREAD says is buffered, the dump fails rather
    than saving part of the data.
    """
    try:
        src = proc.open_fd(pid, fd, os.O_RDONLY | os.O_NONBLOCK)
    except AccessDenied:
        owner = proc.stat_fd(pid, fd).st_uid
        raise AccessDenied(f"pid {pid} fd {fd}: cannot open the pipe to copy its buffered data: "
                           f"it belongs to uid {owner}") from None
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        size = fcntl.fcntl(src, F_GETPIPE_SZ)
        buffered = struct.unpack("i", fcntl.ioctl(src, termios.FIONREAD, b"\0" * 4))[0]
        if not buffered:
            return b"", size
        if fcntl.fcntl(w, F_GETPIPE_SZ) < size:
            try:
                fcntl.fcntl(w, F_SETPIPE_SZ, size)
            except OSError as exc:
                raise Unsupported(f"pid {pid} fd {fd}: pipe of {size} bytes holds {buffered}, which pycr "
                                  f"cannot copy: F_SETPIPE_SZ {size} failed: {exc.strerror}") from None
        try:
            n = core.tee(src, w, size, SPLICE_F_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.EAGAIN:
                raise
            n = 0
        if n != buffered:
            raise Unsupported(f"pid {pid} fd {fd}: pipe holds {buffered} bytes, only {n} could be copied")
        chunks, left = [], n
        while left > 0:
            chunk = os.read(r, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks), size
    finally:
        for x in (src, r, w):
            os.close(x)


def collect_pipes_data(files_by_pid):
    """{pipe_id: (bytes, pipe size)} for every pipe and FIFO of the tree, read once through any end."""
    data = {}
    for pid, recs in files_by_pid.items():
        for rec in recs:
            if rec["type"] in ("pipe", "fifo") and rec["pipe_id"] not in data:
                data[rec["pipe_id"]] = peek_pipe(pid, rec["fd"])
    return data
