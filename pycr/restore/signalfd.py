"""signalfd: made again by pycr with its mask, handed to the tasks like any description.

A signalfd reads the signals of whichever task reads it, so the one pycr
makes serves the restored task as the original did.
"""

import ctypes
import os

from pycr.abi import NR
from pycr.errors import ImageError
from pycr.native import core
from pycr.restore.kindparts import entries_by_file, ready_for_task

TYPE = "signalfd"
IMAGE = "signalfd"
SFD_CLOEXEC = os.O_CLOEXEC
UNBLOCKABLE = (1 << (9 - 1)) | (1 << (19 - 1))        # SIGKILL, SIGSTOP: the kernel drops them from a mask


def check(path, body, recs):
    entries_by_file(path, body.signalfds, recs, "signalfd")
    for e in body.signalfds:
        if e.sigmask & UNBLOCKABLE:
            raise ImageError(path, f"corrupt: signalfd {e.file_id} reads SIGKILL/SIGSTOP")


class Objects:
    def __init__(self, images, body):
        self.entries = {e.file_id: e for e in body.signalfds}

    def open(self, rec):
        mask = ctypes.c_uint64(self.entries[rec.file_id].sigmask)
        return ready_for_task(core.syscall(NR["signalfd4"], -1, ctypes.addressof(mask), 8, SFD_CLOEXEC), rec)

    def close(self):
        pass
