"""/proc/PID/syscall: the syscall a blocked task sleeps in.

The first field is the syscall number, "-1" while the task is in the kernel
for another reason, or "running".
"""

from pycr.proc._read import read_text


def syscall(pid, tid=None):
    """The number of the syscall pid (or thread tid) is blocked in, or None."""
    fields = read_text(pid, "syscall", tid).split()
    if not fields or not fields[0].lstrip("-").isdigit():
        return None
    nr = int(fields[0])
    return nr if nr >= 0 else None
