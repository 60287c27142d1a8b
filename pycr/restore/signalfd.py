"""signalfd: made again by pycr with its mask, handed to the tasks like any description.

A signalfd reads the signals of whichever task reads it, so the one pycr
makes serves the restored task as the original did.
"""

import ctypes
import fcntl
import os

from pycr.abi import NR
from pycr.errors import ImageError
from pycr.native import core

TYPE = "signalfd"
IMAGE = "signalfd"
SFD_CLOEXEC = os.O_CLOEXEC
UNBLOCKABLE = (1 << (9 - 1)) | (1 << (19 - 1))        # SIGKILL, SIGSTOP: the kernel drops them from a mask


def check(path, body, recs):
    have = {}
    for e in body.signalfds:
        if e.file_id in have or e.sigmask & UNBLOCKABLE:
            raise ImageError(path, f"corrupt: signalfd {e.file_id} is listed twice or reads SIGKILL/SIGSTOP")
        have[e.file_id] = e
    for pid, rec in recs:
        if rec.file_id not in have:
            raise ImageError(path, f"corrupt: pid {pid} fd {rec.fd} has no signalfd entry")


class Objects:
    def __init__(self, images, body):
        self.entries = {e.file_id: e for e in body.signalfds}

    def open(self, rec):
        mask = ctypes.c_uint64(self.entries[rec.file_id].sigmask)
        fd = core.syscall(NR["signalfd4"], -1, ctypes.addressof(mask), 8, SFD_CLOEXEC)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, rec.flags & os.O_NONBLOCK)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def close(self):
        pass
