"""System-wide /proc files: /proc/sys settings, and what the kernel says of itself.

Errors are one line naming the file (PycrError), as a missing or unreadable
system file is no task's fault.
"""

import os

from pycr.errors import PycrError


def read_system(name):
    """The text of /proc/NAME (meminfo, swaps, devices, cpuinfo, cmdline, sys/...)."""
    try:
        with open(f"/proc/{name}", encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except OSError as exc:
        raise PycrError(f"/proc/{name}: {exc.strerror}") from None


def sysctl(name):
    """/proc/sys/NAME (e.g. "kernel/pid_max"), stripped."""
    return read_system(f"sys/{name}").strip()


def sysctl_int(name):
    return int(sysctl(name))


def exists(pid):
    """Whether /proc holds PID pid (a task, a zombie or a thread of this namespace)."""
    return os.path.exists(f"/proc/{pid}")


def pids():
    """Every PID of this PID namespace, sorted."""
    return sorted(int(name) for name in os.listdir("/proc") if name.isdigit())


def sysv_shm():
    """{shmid: {column: int}} of /proc/sysvipc/shm (key, shmid, perms in octal, size, nattch,
    uid, gid, cuid, cgid, ...): every SysV segment of this IPC namespace."""
    lines = read_system("sysvipc/shm").splitlines()
    if not lines:
        return {}
    names = lines[0].split()
    out = {}
    for line in lines[1:]:
        values = line.split()
        row = {n: int(v, 8) if n == "perms" else int(v) for n, v in zip(names, values)}
        out[row["shmid"]] = row
    return out
