"""/proc/PID/fd and /proc/PID/fdinfo: open descriptors and their state.

fdinfo flags are printed in octal by the kernel; the extra lines depend on the
file type (eventfd-count, tfd, sigmask, ...) and are kept as raw key/values.
"""

from dataclasses import dataclass, field

from pycr.errors import TaskGone
from pycr.proc._read import listdir, read_text, readlink


def fds(pid):
    """{fd: readlink target} for process pid; fds closed meanwhile are skipped."""
    out = {}
    for name in sorted(listdir(pid, "fd"), key=int):
        try:
            out[int(name)] = readlink(pid, f"fd/{name}")
        except TaskGone:
            listdir(pid, "fd")  # still there? then only the fd went away
    return out


def fd_link(pid, fd):
    """What pid's fd refers to (its /proc/PID/fd/N link)."""
    return readlink(pid, f"fd/{fd}")


@dataclass
class FdInfo:
    pos: int = 0
    flags: int = 0
    mnt_id: int = 0
    ino: int = 0
    extra: dict = field(default_factory=dict)   # type-specific key -> [values...]


def parse_fdinfo(text):
    info = FdInfo()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        value = value.strip()
        if key == "pos":
            info.pos = int(value)
        elif key == "flags":
            info.flags = int(value, 8)
        elif key == "mnt_id":
            info.mnt_id = int(value)
        elif key == "ino":
            info.ino = int(value)
        else:
            info.extra.setdefault(key, []).append(value)
    return info


def fdinfo(pid, fd):
    return parse_fdinfo(read_text(pid, f"fdinfo/{fd}"))
