"""One parser per /proc file; each takes a pid (and optionally a tid).

Errors are mapped: a vanished task raises TaskGone, a refused read AccessDenied.
Every read of /proc in pycr goes through here, except memory I/O: bulk reads
and writes through an fd of /proc/PID/mem (see pycr.proc.mem) and the paths
/proc/self/fd/N that pycr hands to a restored task to open.
"""

from pycr.proc.auxv import auxv, auxv_bytes
from pycr.proc.fd import FdInfo, fd_link, fdinfo, fds
from pycr.proc.mem import clear_refs, open_fd, open_map_file, open_mem, open_pagemap, read_mem, stat_fd
from pycr.proc.maps import Vma, maps
from pycr.proc.mountinfo import Mount, mountinfo
from pycr.proc.misc import comm, cwd, exe, personality, rlimit_count, rlimit_name, rlimits, root, RLIMIT_NAMES
from pycr.proc.smaps import SmapsEntry, smaps
from pycr.proc.stat import Stat, stat
from pycr.proc.status import Status, status
from pycr.proc.syscall import syscall
from pycr.proc.system import exists, pids, read_system, sysctl, sysctl_int, sysv_shm
from pycr.proc.tree import children, descendants, tasks
from pycr.proc.timers import PosixTimer, timers
from pycr.proc.locks import FileLock, fd_locks, system_locks

__all__ = ["auxv", "auxv_bytes", "FdInfo", "fd_link", "fdinfo", "fds", "Vma", "maps", "comm", "cwd",
           "exe", "personality", "rlimit_count", "rlimit_name", "rlimits", "root", "RLIMIT_NAMES", "SmapsEntry", "smaps",
           "Stat", "stat", "Status", "status", "children", "descendants", "tasks", "syscall",
           "clear_refs", "open_fd", "open_map_file", "open_mem", "open_pagemap", "read_mem", "stat_fd",
           "exists", "pids", "read_system", "sysctl", "sysctl_int", "Mount", "mountinfo", "sysv_shm",
           "PosixTimer", "timers", "FileLock", "fd_locks", "system_locks"]
