"""/proc/PID/mountinfo: the mounts a process sees (id, device, root, mount point)."""

import re
from dataclasses import dataclass

from pycr.proc._read import read_text

_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field):
    """mountinfo writes space, tab, newline and backslash as \\ooo."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass
class Mount:
    mount_id: int
    major: int
    minor: int
    root: str               # the directory of the filesystem mounted here
    mount_point: str        # where, in the process's view


def mountinfo(pid):
    mounts = []
    for line in read_text(pid, "mountinfo").splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        major, _, minor = fields[2].partition(":")
        mounts.append(Mount(int(fields[0]), int(major), int(minor), _unescape(fields[3]), _unescape(fields[4])))
    return mounts
