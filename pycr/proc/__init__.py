"""One parser per /proc file; each takes a pid (and optionally a tid).

Errors are mapped: a vanished task raises TaskGone, a refused read AccessDenied.
"""

from pycr.proc.auxv import auxv, auxv_bytes
from pycr.proc.fd import FdInfo, fdinfo, fds
from pycr.proc.maps import Vma, maps
from pycr.proc.misc import comm, cwd, exe, personality, rlimit_count, rlimit_name, rlimits, root, RLIMIT_NAMES
from pycr.proc.smaps import SmapsEntry, smaps
from pycr.proc.stat import Stat, stat
from pycr.proc.status import Status, status
from pycr.proc.tree import children, descendants, tasks

__all__ = ["auxv", "auxv_bytes", "FdInfo", "fdinfo", "fds", "Vma", "maps", "comm", "cwd",
           "exe", "personality", "rlimit_count", "rlimit_name", "rlimits", "root", "RLIMIT_NAMES", "SmapsEntry", "smaps",
           "Stat", "stat", "Status", "status", "children", "descendants", "tasks"]
