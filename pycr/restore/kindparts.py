"""What the restore modules of kernel-object kinds share: checking their entries, handing out their fds.

Kept apart from restore/kinds.py, which imports every kind module: a kind
module importing kinds.py would import itself half-made.
"""

import fcntl
import os

from pycr.errors import ImageError


def entries_by_file(path, entries, recs, what, file_ids=lambda e: (e.file_id,)):
    """{file_id: entry} of an image with one entry per open file description (file_ids(e): the
    descriptions e stands for). Each description is listed once and every fd record of the kind
    (recs: [(pid, rec)]) has one, else the image is corrupt: no fd may come back without its state."""
    by_file = {}
    for e in entries:
        for file_id in file_ids(e):
            if file_id in by_file:
                raise ImageError(path, f"corrupt: open file {file_id} has two {what} entries")
            by_file[file_id] = e
    for pid, rec in recs:
        if rec.file_id not in by_file:
            raise ImageError(path, f"corrupt: pid {pid} fd {rec.fd} has no {what} entry")
    return by_file


def ready_for_task(fd, rec, set_up=None):
    """fd, pycr's new description for rec, once set_up(fd) has run, with the O_NONBLOCK rec had:
    pycr makes it the way its own set-up needs, the task must find the flag it had. A step that
    fails closes fd, so a failed restore leaves no fd behind in pycr."""
    try:
        if set_up is not None:
            set_up(fd)
        fcntl.fcntl(fd, fcntl.F_SETFL, rec.flags & os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd
