"""Small per-process values: comm, personality, cwd/root/exe links, rlimits.

rlimits are parsed from /proc/PID/limits: prlimit64(pid) would be simpler,
but reading another user's limits that way needs CAP_SYS_RESOURCE, which a
dumping root may lack; the file is readable by anyone.
"""

from pycr.proc._read import read_text, readlink

RLIMIT_NAMES = ("cpu", "fsize", "data", "stack", "core", "rss", "nproc", "nofile",
                "memlock", "as", "locks", "sigpending", "msgqueue", "nice", "rtprio", "rttime")
RLIM_INFINITY = (1 << 64) - 1


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


def parse_limits(text):
    """(cur, max) pairs in RLIMIT_* order from the text of /proc/PID/limits.

    The kernel prints the rows in RLIMIT_* order, values as numbers or
    "unlimited", in columns after the limit's name (which has spaces).
    """
    out = []
    for line in text.splitlines()[1:]:
        words = line.split()
        values = [w for w in words if w.isdigit() or w == "unlimited"]
        if len(values) < 2:
            continue
        cur, mx = (RLIM_INFINITY if v == "unlimited" else int(v) for v in values[:2])
        out.append((cur, mx))
    if len(out) != len(RLIMIT_NAMES):
        raise ValueError(f"/proc/PID/limits has {len(out)} limits, expected {len(RLIMIT_NAMES)}")
    return out


def rlimits(pid):
    """All 16 rlimits of pid as a list of (cur, max), in RLIMIT_* order."""
    return parse_limits(read_text(pid, "limits"))
