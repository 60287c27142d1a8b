"""What the running system must offer before any task is created.

PIDs free, every file that fds, mappings, cwd and exe name still there, and
no mapped file shrunk below its mapped offset. Checking now means a failed
restore usually leaves nothing to clean up.
"""

import os

from pycr.errors import RestoreError, Unsupported

DELETED = " (deleted)"


def pid_max():
    with open("/proc/sys/kernel/pid_max") as f:
        return int(f.read())


def check_pids(images):
    limit = pid_max()
    for p in images.processes:
        for tid in p.tids:
            if tid >= limit:
                raise RestoreError(f"pid {tid} is not below pid_max {limit}")
            if os.path.exists(f"/proc/{tid}"):
                raise RestoreError(f"pid {tid} is in use; restore with --pidns")


def _stat(path):
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RestoreError(f"{path}: {exc.strerror}") from None


def check_files(images):
    for p in images.processes:
        for rec in p.fds:
            kind = str(rec.type)
            if kind == "unsupported":
                raise Unsupported(f"pid {p.pid} fd {rec.fd}: {rec.path} is not supported")
            if kind in ("pipe",):
                continue
            if rec.deleted or rec.path.endswith(DELETED):
                raise RestoreError(f"pid {p.pid} fd {rec.fd}: {rec.path} was deleted before the dump")
            if _stat(rec.path) is None:
                raise RestoreError(f"pid {p.pid} fd {rec.fd}: {rec.path} no longer exists")
        for vma in p.mm.vmas:
            if str(vma.kind) != "file":
                continue
            path = vma.path
            if path.endswith(DELETED):
                raise RestoreError(f"pid {p.pid}: mapped file {path[:-len(DELETED)]} was deleted")
            st = _stat(path)
            if st is None:
                raise RestoreError(f"pid {p.pid}: mapped file {path} no longer exists")
            if st.st_size <= vma.pgoff:
                raise RestoreError(f"pid {p.pid}: mapped file {path} shrank to {st.st_size} bytes, "
                                   f"below its mapped offset {vma.pgoff}")
        exe = p.mm.exe
        if exe and not exe.endswith(DELETED) and _stat(exe) is None:
            raise RestoreError(f"pid {p.pid}: executable {exe} no longer exists")
        for what, path in (("cwd", p.core.cwd), ("root", p.core.root)):
            if path.endswith(DELETED) or _stat(path) is None:
                raise RestoreError(f"pid {p.pid}: {what} {path} no longer exists")


def check(images, pidns):
    if not pidns:
        check_pids(images)
    check_files(images)
