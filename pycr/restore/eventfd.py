"""eventfd: made again by pycr with its counter, handed to the tasks like any description."""

import fcntl
import os

from pycr.errors import ImageError

TYPE = "eventfd"
IMAGE = "eventfd"
COUNT_MAX = 2**64 - 2           # the kernel's ULLONG_MAX - 1


def check(path, body, recs):
    have = {}
    for e in body.eventfds:
        if e.file_id in have or e.count > COUNT_MAX:
            raise ImageError(path, f"corrupt: eventfd {e.file_id} is listed twice or counts past {COUNT_MAX}")
        have[e.file_id] = e
    for pid, rec in recs:
        if rec.file_id not in have:
            raise ImageError(path, f"corrupt: pid {pid} fd {rec.fd} has no eventfd entry")


class Objects:
    def __init__(self, images, body):
        self.entries = {e.file_id: e for e in body.eventfds}

    def open(self, rec):
        e = self.entries[rec.file_id]
        flags = os.EFD_CLOEXEC | os.EFD_NONBLOCK | (os.EFD_SEMAPHORE if e.semaphore else 0)
        fd = os.eventfd(0, flags)
        try:
            if e.count:
                os.eventfd_write(fd, e.count)
            fcntl.fcntl(fd, fcntl.F_SETFL, rec.flags & os.O_NONBLOCK)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def close(self):
        pass
