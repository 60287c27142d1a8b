"""/proc/PID/cgroup and the cgroup mounts of /proc/PID/mountinfo.

A hybrid host lists one line per cgroup v1 hierarchy ("ID:controllers:path")
and one for cgroup2 ("0::path"); a thread of a v1 hierarchy may sit in another
cgroup than its process, so the file is read per thread where that matters.
"""

from dataclasses import dataclass

from pycr.proc._read import read_text
from pycr.proc.mountinfo import _unescape


@dataclass(frozen=True)
class Membership:
    hierarchy: int           # 0 for cgroup2
    controllers: tuple       # v1: the hierarchy's controllers ("cpu", "cpuacct", "name=systemd", ...); v2: ()
    path: str                # the cgroup, relative to the hierarchy's root ("/" for the root)


@dataclass(frozen=True)
class CgroupMount:
    version: int             # 1 or 2
    controllers: tuple       # v1: from the super options; v2: ()
    root: str                # the hierarchy's directory mounted here ("/" unless a namespace or bind)
    mount_point: str


def cgroup(pid, tid=None):
    """Every hierarchy's membership of process pid (or its thread tid)."""
    out = []
    for line in read_text(pid, "cgroup", tid).splitlines():
        ident, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        out.append(Membership(int(ident), tuple(c for c in controllers.split(",") if c), path))
    return out


def cgroup_mounts(pid="self"):
    """The cgroup and cgroup2 mounts pid sees."""
    out = []
    for line in read_text(pid, "mountinfo").splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        after = line.split(" - ", 1)[1].split()
        if len(after) < 3 or after[0] not in ("cgroup", "cgroup2"):
            continue
        version = 2 if after[0] == "cgroup2" else 1
        opts = after[2].split(",")
        known = {"rw", "ro", "relatime", "noatime", "nosuid", "nodev", "noexec", "nsdelegate",
                 "memory_recursiveprot", "clone_children", "noprefix", "xattr", "favordynmods",
                 "memory_localevents", "memory_hugetlb_accounting", "cpuset_v2_mode"}
        controllers = () if version == 2 else tuple(o for o in opts if o not in known and "=" not in o)
        out.append(CgroupMount(version, controllers, _unescape(fields[3]), _unescape(fields[4])))
    return out
