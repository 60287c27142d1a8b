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

from .. import proc
from ..errors import AccessDenied, Unsupported, TaskGone
from ..native import core

F_GETPIPE_SZ = 1032
F_SETPIPE_SZ = 1031
SPLICE_F_NONBLOCK = 2
O_CLOEXEC = 0o2000000
TTY_MAJORS = {4, 5} | set(range(136, 144))
FAMILY_NAMES = {getattr(socket, n): n for n in dir(socket) if n.startswith("AF_")}


def _socket_family(pid, fd):
    """The AF_* name of a socket fd of another process (for the refusal message)."""
    try:
        pidfd = core.pidfd_open(pid)
        try:
            mine = core.pidfd_getfd(pidfd, fd)
        finally:
            os.close(pidfd)
        sock = socket.socket(fileno=mine)   # owns mine from here on
        try:
            return FAMILY_NAMES.get(sock.family, str(int(sock.family)))
        finally:
            sock.close()
    except OSError:
        return "unknown family"


def describe_fd(pid, fd, target):
    """One fd record of the files image; raises Unsupported for what pycr cannot restore."""
    info = proc.fdinfo(pid, fd)
    try:
        s = os.stat(f"/proc/{pid}/fd/{fd}")
    except FileNotFoundError:
        raise TaskGone(pid, f"fd {fd} closed while frozen")
    rec = {"fd": fd, "type": "reg", "flags": info.flags & ~O_CLOEXEC, "pos": info.pos,
           "cloexec": bool(info.flags & O_CLOEXEC), "path": target, "deleted": False,
           "pipe_id": 0, "rdev": 0, "size": 0, "file_id": 0,
           "_same_file": (s.st_dev, s.st_ino, info.flags, info.pos)}
    mode = s.st_mode
    if st.S_ISREG(mode):
        rec["size"] = s.st_size
        if target.endswith(" (deleted)"):
            raise Unsupported(f"pid {pid} fd {fd}: deleted file {target[:-10]} is not supported")
    elif st.S_ISDIR(mode):
        rec["type"] = "dir"
    elif st.S_ISFIFO(mode):
        if target.startswith("pipe:["):
            rec.update(type="pipe", pipe_id=s.st_ino, path="")
        else:
            rec.update(type="fifo", pipe_id=s.st_ino)
    elif st.S_ISCHR(mode):
        rec["rdev"] = s.st_rdev
        rec["type"] = "tty" if os.major(s.st_rdev) in TTY_MAJORS else "chr"
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
                if core.kcmp(pid, other_pid, core.KCMP_FILE, rec["fd"], other["fd"]) == 0:
                    rec["file_id"] = other["file_id"]
                    break
            else:
                rec["file_id"] = next_id
                next_id += 1
                candidates.append((pid, rec))


def peek_pipe(pid, fd):
    """The bytes buffered in the pipe behind pid's fd, left in place."""
    try:
        src = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except PermissionError:
        owner = os.stat(f"/proc/{pid}/fd/{fd}").st_uid
        raise AccessDenied(f"pid {pid} fd {fd}: cannot open the pipe to copy its buffered data: "
                           f"it belongs to uid {owner}") from None
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        size = fcntl.fcntl(src, F_GETPIPE_SZ)
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, size)
        except OSError:
            pass
        try:
            n = core.tee(src, w, size, SPLICE_F_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                return b""   # empty pipe
            raise
        chunks, left = [], n
        while left > 0:
            chunk = os.read(r, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        for x in (src, r, w):
            os.close(x)


def collect_pipes_data(files_by_pid):
    """{pipe_id: bytes} for every pipe of the tree, read once through any end."""
    data = {}
    for pid, recs in files_by_pid.items():
        for rec in recs:
            if rec["type"] in ("pipe", "fifo") and rec["pipe_id"] not in data:
                data[rec["pipe_id"]] = peek_pipe(pid, rec["fd"])
    return data
