"""signalfd: the mask of signals it reads, from /proc/PID/fdinfo.

Which signals are pending is the task's state, not the signalfd's: the core
image carries them. O_NONBLOCK is in the fd record's flags.
"""

from .. import proc
from ..errors import Unsupported

TYPE = "signalfd"
IMAGE = "signalfd"


def matches(pid, fd, target, st):
    return target == "anon_inode:[signalfd]"


def collect(objects):
    entries = []
    for held in objects:
        mask = proc.fdinfo(held.pid, held.fd).extra.get("sigmask")
        if not mask:
            raise Unsupported(f"pid {held.pid} fd {held.fd}: signalfd without sigmask in its fdinfo (kernel too old)")
        entries.append({"file_id": held.file_id, "sigmask": int(mask[0], 16)})
    return {"signalfds": entries}
