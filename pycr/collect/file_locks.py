"""File locks the tree holds: flock(2), POSIX record locks and OFD locks.

The `lock:` lines of /proc/PID/fdinfo/N name each lock held through that fd's
open file description (see pycr.proc.locks). A flock or OFD lock belongs to
the description, so it is listed under every fd of it, in every process that
shares it, and is kept once; a POSIX lock belongs to the process (its fd
table). Without --file-locks a tree holding any is refused, as criu does:
restoring it without its locks would let another process in.
"""

from .. import options, proc
from ..errors import Unsupported
from ..log import log

KINDS = {"POSIX": "posix", "FLOCK": "flock", "OFDLCK": "ofd"}
ACCESS = {"READ": False, "WRITE": True}


def collect_file_locks(files):
    """[lock record] of every process; files: {pid: (live tid to read through, fd records)}."""
    pids = set(files)
    found, seen = [], set()
    for pid, (src, recs) in files.items():
        for rec in recs:
            for lock in proc.fd_locks(src, rec["fd"]):
                where = f"pid {pid} fd {rec['fd']}"
                kind = KINDS.get(lock.cls)
                if kind is None or lock.access not in ACCESS:
                    raise Unsupported(f"{where}: a {lock.cls} {lock.access} on {rec['path']} is not supported")
                if not options.current().file_locks:
                    raise Unsupported(f"{where}: holds a {lock.cls} {lock.access.lower()} lock on {rec['path']}; "
                                      "dump with --file-locks to take it")
                owner = lock.pid if kind == "posix" and lock.pid in pids else pid
                key = (kind, owner if kind == "posix" else 0, rec["file_id"], lock.access, lock.start, lock.end)
                if key in seen:
                    continue
                seen.add(key)
                found.append({"kind": kind, "write": ACCESS[lock.access], "pid": owner,
                              "fd": rec["fd"] if owner == pid else _fd_of(files[owner][1], rec["file_id"], rec["fd"]),
                              "file_id": rec["file_id"], "start": lock.start, "length": lock.length})
                log.info("%s: %s %s lock on %s, bytes %d..%s", where, lock.cls, lock.access.lower(), rec["path"],
                         lock.start, "EOF" if lock.length == 0 else lock.end)
    return found


def _fd_of(recs, file_id, fallback):
    """An fd of the owning process on the same description (CLONE_FILES: the same table)."""
    for rec in recs:
        if rec["file_id"] == file_id:
            return rec["fd"]
    return fallback
