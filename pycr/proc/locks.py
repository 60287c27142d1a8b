"""The `lock:` lines of /proc/PID/fdinfo/N: the file locks held through that fd.

The kernel lists there every lock on the file's inode whose struct file is
this fd's and whose owner is this fd table (POSIX record locks) or this open
file description (flock and OFD locks), in /proc/locks' format:

    lock:	1: POSIX  ADVISORY  WRITE 1234 08:01:131 0 EOF
    lock:	2: FLOCK  ADVISORY  READ  1234 08:01:131 0 EOF
    lock:	3: OFDLCK ADVISORY  WRITE -1 08:01:131 100 199

class, mode, access, pid (-1 for OFD locks), dev:ino, first byte, last byte or EOF.
"""

from dataclasses import dataclass

from pycr.errors import PycrError
from pycr.proc.fd import fdinfo

EOF_OFFSET = 2**63 - 1           # OFFSET_MAX: a lock "to EOF" (to the end of any file)


@dataclass
class FileLock:
    cls: str             # POSIX, FLOCK, OFDLCK, or another class (LEASE, DELEG...)
    access: str          # READ or WRITE (a lease: its own words)
    pid: int
    start: int
    end: int             # last byte, EOF_OFFSET for "EOF"

    @property
    def length(self):
        """struct flock's l_len: 0 means to the end of the file."""
        return 0 if self.end == EOF_OFFSET else self.end - self.start + 1


def parse_lock_line(value):
    """FileLock from one `lock:` value of fdinfo (without the key)."""
    words = value.split()
    try:
        if words[1] == "->":                 # a blocked waiter (not listed in fdinfo today)
            words = words[:1] + words[2:]
        cls, access, pid, start, end = words[1], words[3], int(words[4]), int(words[6]), words[7]
        return FileLock(cls, access, pid, start, EOF_OFFSET if end == "EOF" else int(end))
    except (IndexError, ValueError):
        raise PycrError(f"fdinfo: cannot parse the lock line {value!r}") from None


def fd_locks(pid, fd):
    """[FileLock] held through fd of process pid."""
    return [parse_lock_line(v) for v in fdinfo(pid, fd).extra.get("lock", [])]


def system_locks():
    """[(FileLock, dev "MAJ:MIN", inode)] of /proc/locks: every lock of the system (pids as seen here)."""
    from pycr.proc.system import read_system
    out = []
    for line in read_system("locks").splitlines():
        if " -> " in line:              # a waiter, not a holder
            continue
        words = line.split()
        if len(words) < 8:
            continue
        maj, mino, ino = words[5].split(":")
        out.append((parse_lock_line(line), f"{int(maj, 16)}:{int(mino, 16)}", int(ino)))
    return out
