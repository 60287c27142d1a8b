"""epoll: every registration (watched fd, events, data) of every epoll set.

fdinfo lists one `tfd: N events: X data: D` line per registration; N is an
fd number in the table of the process that registered it, which fdinfo does
not name, and the process may have closed N since (the registration lives as
long as the file does) or reused it for another file. kcmp(KCMP_EPOLL_TFD)
asks the kernel whether fd N of a holder is the registered file: the
registration is restored by the first holder for which it is, and refused by
name when none is. A fired EPOLLONESHOT registration shows only its flag
bits (the kernel clears its events): it is kept so, disarmed.

Whether anything was ready in the set is asked with poll() on pycr's copy
(it only drops stale entries from the ready list, as epoll_wait would): an
idle set restored with edge-triggered registrations must not report the
edges the program had already consumed.
"""

import ctypes
import os
import re
import select

from .. import abi, proc
from ..errors import Unsupported
from ..native import core

TYPE = "eventpoll"
IMAGE = "eventpoll"
TFD_LINE = re.compile(r"^\s*(\d+)\s+events:\s*([0-9a-fA-F]+)\s+data:\s*([0-9a-fA-F]+)")


class KcmpEpollSlot(ctypes.Structure):
    _fields_ = [("efd", ctypes.c_uint32), ("tfd", ctypes.c_uint32), ("toff", ctypes.c_uint32)]


def matches(pid, fd, target, st):
    return target == "anon_inode:[eventpoll]"


def registrations(pid, fd):
    """[(tfd, events, data)] of the epoll at pid's fd, in the kernel's order."""
    out = []
    for line in proc.fdinfo(pid, fd).extra.get("tfd", []):
        m = TFD_LINE.match(line)
        if not m:
            raise Unsupported(f"pid {pid} fd {fd}: epoll fdinfo line 'tfd: {line}' is not understood")
        out.append((int(m.group(1)), int(m.group(2), 16), int(m.group(3), 16)))
    return out


def holds_target(pid, epfd, tfd, toff):
    """Is pid's fd tfd the file registered in its epoll epfd as the toff-th entry numbered tfd?"""
    slot = KcmpEpollSlot(epfd, tfd, toff)
    try:
        return core.kcmp(pid, pid, abi.KCMP_EPOLL_TFD, tfd, ctypes.addressof(slot)) == 0
    except OSError:             # EBADF: pid has no fd tfd; ENOENT: no such entry
        return False


def _poll_idle(fd):
    p = select.poll()
    p.register(fd, select.POLLIN)
    return not p.poll(0)


def read_one(held):
    pid, fd = held.pid, held.fd
    targets, seen = [], {}
    for tfd, events, data in registrations(pid, fd):
        toff = seen[tfd] = seen.get(tfd, -1) + 1
        owner = next((hpid for hpid, hfd in held.holders if holds_target(hpid, hfd, tfd, toff)), None)
        if owner is None:
            raise Unsupported(f"pid {pid} fd {fd}: epoll watches fd {tfd}, which the process has closed "
                              "(the file is still open elsewhere)")
        targets.append({"pid": owner, "tfd": tfd, "events": events, "data": data})
    return {"file_id": held.file_id, "idle": _poll_idle_of(pid, fd), "targets": targets}


def _poll_idle_of(pid, fd):
    mine = core.dup_from(pid, fd)
    try:
        return _poll_idle(mine)
    finally:
        os.close(mine)


def collect(objects):
    return {"eventpolls": [read_one(held) for held in objects]}
