"""eventfd: its counter and whether it counts as a semaphore, from /proc/PID/fdinfo."""

from .. import proc
from ..errors import Unsupported

TYPE = "eventfd"
IMAGE = "eventfd"


def matches(pid, fd, target, st):
    return target == "anon_inode:[eventfd]"


def _field(info, key, pid, fd):
    values = info.extra.get(key)
    if not values:
        raise Unsupported(f"pid {pid} fd {fd}: eventfd without {key} in its fdinfo (kernel too old)")
    return values[0]


def collect(objects):
    entries = []
    for held in objects:
        info = proc.fdinfo(held.pid, held.fd)
        count = int(_field(info, "eventfd-count", held.pid, held.fd), 16)
        # eventfd-semaphore appeared in Linux 6.6; before it only EFD_SEMAPHORE-less eventfds are safe.
        semaphore = info.extra.get("eventfd-semaphore", ["0"])[0] != "0"
        entries.append({"file_id": held.file_id, "count": count, "semaphore": semaphore})
    return {"eventfds": entries}
