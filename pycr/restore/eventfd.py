"""eventfd: made again by pycr with its counter, handed to the tasks like any description."""

import os

from pycr.errors import ImageError
from pycr.restore.kindparts import entries_by_file, ready_for_task

TYPE = "eventfd"
IMAGE = "eventfd"
COUNT_MAX = 2**64 - 2           # the kernel's ULLONG_MAX - 1


def check(path, body, recs):
    entries_by_file(path, body.eventfds, recs, "eventfd")
    for e in body.eventfds:
        if e.count > COUNT_MAX:
            raise ImageError(path, f"corrupt: eventfd {e.file_id} counts past {COUNT_MAX}")


class Objects:
    def __init__(self, images, body):
        self.entries = {e.file_id: e for e in body.eventfds}

    def open(self, rec):
        e = self.entries[rec.file_id]
        flags = os.EFD_CLOEXEC | os.EFD_NONBLOCK | (os.EFD_SEMAPHORE if e.semaphore else 0)
        return ready_for_task(os.eventfd(0, flags), rec, lambda fd: os.eventfd_write(fd, e.count) if e.count else None)

    def close(self):
        pass
