"""inotify: every watch (wd, mask, watched inode and a path to it).

fdinfo gives each watch's wd, mask, inode number, device and file handle;
the path comes from open_by_handle_at(2) (CAP_DAC_READ_SEARCH) on a mount of
that device that the holder sees, and is checked to lead to the same inode.
Events queued and not read yet cannot be put back into a new instance: a
dump refuses them by name (FIONREAD on pycr's copy says how many bytes).
"""

import ctypes
import errno
import fcntl
import os
import re
import struct
import termios

from .. import abi, proc
from ..abi import NR
from ..errors import Unsupported
from ..native import core

TYPE = "inotify"
IMAGE = "inotify"
WATCH = re.compile(r"^(\d+) ino:([0-9a-f]+) sdev:([0-9a-f]+) mask:([0-9a-f]+) ignored_mask:[0-9a-f]+ "
                   r"fhandle-bytes:([0-9a-f]+) fhandle-type:([0-9a-f]+) f_handle:([0-9a-f]*)")
KDEV_MINOR_BITS = 20                # the kernel's own dev_t, as fdinfo prints it


def matches(pid, fd, target, st):
    return target == "anon_inode:inotify"


def queued_bytes(pid, fd):
    mine = core.dup_from(pid, fd)
    try:
        return struct.unpack("i", fcntl.ioctl(mine, termios.FIONREAD, b"\0" * 4))[0]
    finally:
        os.close(mine)


def _open_handle(mount_fd, handle_type, handle):
    buf = ctypes.create_string_buffer(struct.pack("<Ii", len(handle), handle_type) + handle)
    return core.syscall(NR["open_by_handle_at"], mount_fd, ctypes.addressof(buf), os.O_PATH | os.O_CLOEXEC)


def path_of(pid, fd, major, minor, ino, handle_type, handle):
    """A path (in pycr's view) to the watched inode, found through its file handle."""
    mounts = [m for m in proc.mountinfo(pid) if (m.major, m.minor) == (major, minor)]
    mounts.sort(key=lambda m: m.root != "/")
    why = f"no mount of device {major}:{minor} is visible to the process"
    for m in mounts:
        try:
            mount_fd = os.open(f"/proc/{pid}/root{m.mount_point}", os.O_RDONLY | os.O_CLOEXEC)   # not O_PATH: EBADF
        except OSError as exc:
            why = f"{m.mount_point}: {exc.strerror}"
            continue
        try:
            found = _open_handle(mount_fd, handle_type, handle)
        except OSError as exc:
            why = "open_by_handle_at: " + (exc.strerror if exc.errno != errno.EPERM
                                            else "needs CAP_DAC_READ_SEARCH")
            continue
        finally:
            os.close(mount_fd)
        try:
            path = os.readlink(f"/proc/self/fd/{found}")
        finally:
            os.close(found)
        if path.endswith(" (deleted)"):
            why = f"{path[:-10]} was deleted"
            continue
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError as exc:
            why = f"{path}: {exc.strerror}"
            continue
        if (st.st_ino, os.major(st.st_dev), os.minor(st.st_dev)) == (ino, major, minor):
            return path, st.st_dev
        why = f"{path} is another inode"
    raise Unsupported(f"pid {pid} fd {fd}: inotify watches inode {ino} of device {major}:{minor}, which has no "
                      f"path pycr can find ({why})")


def read_one(held):
    pid, fd = held.pid, held.fd
    queued = queued_bytes(pid, fd)
    if queued:
        raise Unsupported(f"pid {pid} fd {fd}: inotify has {queued} bytes of events not read yet")
    watches = []
    for line in proc.fdinfo(pid, fd).extra.get("inotify wd", []):
        m = WATCH.match(line)
        if not m:
            raise Unsupported(f"pid {pid} fd {fd}: inotify fdinfo line 'inotify wd:{line}' is not understood")
        wd, ino, sdev, mask = int(m.group(1)), int(m.group(2), 16), int(m.group(3), 16), int(m.group(4), 16)
        handle = bytes.fromhex(m.group(7))[: int(m.group(5), 16)]
        path, dev = path_of(pid, fd, sdev >> KDEV_MINOR_BITS, sdev & ((1 << KDEV_MINOR_BITS) - 1), ino,
                            int(m.group(6), 16), handle)
        watches.append({"wd": wd, "mask": mask & abi.IN_ALL_WATCH_BITS, "dev": dev, "ino": ino, "path": path})
    watches.sort(key=lambda w: w["wd"])
    return {"file_id": held.file_id, "watches": watches}


def collect(objects):
    return {"inotifies": [read_one(held) for held in objects]}
