"""Small per-process values: comm, personality, cwd/root/exe links, rlimits.

rlimits are parsed from /proc/PID/limits: prlimit64(pid) would be simpler,
but reading another user's limits that way needs CAP_SYS_RESOURCE, which a
dumping root may lack; the file is readable by anyone. It has one row per
limit the running kernel knows (RLIM_NLIMITS), so its length is the count.
"""

from pycr.abi import RLIM_INFINITY
from pycr.errors import PycrError
from pycr.proc._read import read_text, readlink

#: Names of the limits every Linux has had since 2.6.25, by RLIMIT_* number.
RLIMIT_NAMES = ("cpu", "fsize", "data", "stack", "core", "rss", "nproc", "nofile",
                "memlock", "as", "locks", "sigpending", "msgqueue", "nice", "rtprio", "rttime")


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


def rlimit_name(res):
    """RLIMIT_NOFILE style name of limit number res (a number past the known ones)."""
    return f"RLIMIT_{RLIMIT_NAMES[res].upper()}" if res < len(RLIMIT_NAMES) else f"rlimit {res}"


def parse_limits(text):
    """(cur, max) pairs in RLIMIT_* order from the text of /proc/PID/limits.

    The kernel prints one row per limit it has, in RLIMIT_* order, values as
    numbers or "unlimited", in columns after the limit's name (which has spaces).
    """
    out = []
    for line in text.splitlines()[1:]:
        words = line.split()
        values = [w for w in words if w.isdigit() or w == "unlimited"]
        if len(values) < 2:
            raise ValueError(f"/proc/PID/limits: cannot parse {line!r}")
        cur, mx = (RLIM_INFINITY if v == "unlimited" else int(v) for v in values[:2])
        out.append((cur, mx))
    return out


def rlimits(pid):
    """Every rlimit the kernel has for pid, as a list of (cur, max) in RLIMIT_* order."""
    try:
        return parse_limits(read_text(pid, "limits"))
    except ValueError as exc:
        raise PycrError(f"pid {pid}: {exc}") from None


def rlimit_count():
    """How many limits this kernel knows (RLIM_NLIMITS): the rows of our own limits file."""
    return len(parse_limits(read_text("self", "limits")))
