"""Small per-process values: comm, personality, cwd/root/exe links, rlimits.

rlimits come from prlimit64(pid) rather than /proc/PID/limits, whose text
rounds nothing but spells "unlimited" and units that would need a parser.
"""

import ctypes
import os

from pycr.errors import from_oserror
from pycr.proc._read import read_text, readlink

RLIMIT_NAMES = ("cpu", "fsize", "data", "stack", "core", "rss", "nproc", "nofile",
                "memlock", "as", "locks", "sigpending", "msgqueue", "nice", "rtprio", "rttime")
RLIM_INFINITY = (1 << 64) - 1

_libc = ctypes.CDLL(None, use_errno=True)


class _Rlimit(ctypes.Structure):
    _fields_ = [("cur", ctypes.c_uint64), ("max", ctypes.c_uint64)]


_libc.prlimit.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Rlimit), ctypes.POINTER(_Rlimit)]
_libc.prlimit.restype = ctypes.c_int


def comm(pid, tid=None):
    return read_text(pid, "comm", tid).rstrip("\n")


def personality(pid):
    return int(read_text(pid, "personality"), 16)


def cwd(pid):
    return readlink(pid, "cwd")


def root(pid):
    return readlink(pid, "root")


def exe(pid):
    return readlink(pid, "exe")


def rlimits(pid):
    """All 16 rlimits of pid as a list of (cur, max), in RLIMIT_* order."""
    out = []
    for res in range(len(RLIMIT_NAMES)):
        old = _Rlimit()
        if _libc.prlimit(pid, res, None, ctypes.byref(old)) != 0:
            err = ctypes.get_errno()
            raise from_oserror(OSError(err, os.strerror(err)), pid, "prlimit") from None
        out.append((old.cur, old.max))
    return out
