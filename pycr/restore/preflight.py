"""What the running system must offer before any task is created.

PIDs free, every file that fds, mappings, cwd and exe name still there, no
mapped file shrunk below its mapped offset, every address a socket was
bound to on this host, and every pty's /dev/pts/N free. Checking now means a failed restore usually leaves
nothing to clean up.
"""

import os

from pycr import options, proc
from pycr.errors import PycrError, RestoreError, Unsupported
from pycr.log import log
from pycr.ptrace import xstate as X
from pycr.restore import files, ghost, kinds, mm, process
from pycr.restore.pipe_ends import PIPE_OUTLOOK, lonely_pipe_ends

DELETED = " (deleted)"


def pid_max():
    with open("/proc/sys/kernel/pid_max") as f:
        return int(f.read())


PIDS_TAKEN = "restore with --pidns"


def check_pids(images, advice=PIDS_TAKEN):
    """Every PID (and TID) of the tree free in pycr's PID namespace; advice ends the refusal."""
    limit = pid_max()
    # A zombie leader's pid is not among its tids, and a zombie child needs its pid too.
    needed = [tid for p in images.processes for tid in dict.fromkeys([p.pid, *p.tids])]
    for tid in needed + [z.pid for z in images.zombies]:
        if tid >= limit:
            raise RestoreError(f"pid {tid} is not below pid_max {limit}")
        if os.path.exists(f"/proc/{tid}"):
            raise RestoreError(f"pid {tid} is in use{_same_program(tid, images)}; {advice}")


def _same_program(pid, images):
    """When pid's holder has the name the images give that pid: it may be the tree itself, still
    running (or restored already), and --pidns would run a second copy: say so."""
    want = next((str(p.core.comm) for p in images.processes if pid in (p.pid, *p.tids)), None)
    try:
        with open(f"/proc/{pid}/comm") as f:
            have = f.read().strip()
    except OSError:
        return ""
    if want is None or have != want:
        return ""
    return f" by a {have}, as in the images: is this tree running already? (--pidns would run a second copy)"


def _stat(path):
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RestoreError(f"{path}: {exc.strerror}") from None


def check_files(images):
    tree_pids = {tid for p in images.processes for tid in p.tids}
    for p in images.processes:
        for rec in p.fds:
            kind = str(rec.type)
            if kind == "unsupported":
                raise Unsupported(f"pid {p.pid} fd {rec.fd}: {rec.path} is not supported")
            if kind in ("pipe",) or kind in kinds.TYPES:
                continue            # made by pycr, checked by their kind's module at load
            if kind in files.SEEKABLE and files.tree_proc_pid(rec.path, tree_pids) is not None:
                continue            # under /proc/PID of the tree: there again once the tasks are
            if kind == "reg" and rec.deleted:
                continue            # a ghost file: its contents are in the images (restore/ghost.py)
            if rec.deleted or rec.path.endswith(DELETED):
                raise RestoreError(f"pid {p.pid} fd {rec.fd}: {rec.path} was deleted before the dump")
            st = _stat(rec.path)
            if st is None:
                raise RestoreError(f"pid {p.pid} fd {rec.fd}: {rec.path} no longer exists")
            if kind == "reg" and st.st_size < rec.size:
                raise RestoreError(f"pid {p.pid} fd {rec.fd}: {rec.path} shrank from {rec.size} "
                                   f"to {st.st_size} bytes since the dump")
        for vma in p.mm.vmas:
            if str(vma.kind) != "file" or vma.path.startswith("/memfd:") or ghost.is_ghost_vma(vma):
                continue            # memfds and ghost files are made from the images
            path = vma.path
            if path.endswith(DELETED):
                raise RestoreError(f"pid {p.pid}: mapped file {path[:-len(DELETED)]} was deleted")
            st = _stat(path)
            if st is None:
                raise RestoreError(f"pid {p.pid}: mapped file {path} no longer exists")
            if vma.file_size and (st.st_size, st.st_mtime_ns) != (vma.file_size, vma.file_mtime_ns):
                raise RestoreError(f"pid {p.pid}: mapped file {path} changed since the dump (size "
                                   f"{vma.file_size} -> {st.st_size} bytes or modification time differs)")
            if st.st_size <= vma.pgoff:
                raise RestoreError(f"pid {p.pid}: mapped file {path} shrank to {st.st_size} bytes, "
                                   f"below its mapped offset {vma.pgoff}")
        exe = p.mm.exe
        if exe and not exe.endswith(DELETED) and _stat(exe) is None:
            raise RestoreError(f"pid {p.pid}: executable {exe} no longer exists")
        for what, path in (("cwd", p.core.cwd), ("root", p.core.root)):
            if path.endswith(DELETED) or _stat(path) is None:
                raise RestoreError(f"pid {p.pid}: {what} {path} no longer exists")


def check_pipes(images):
    """A pipe with one end outside the tree comes back with pycr holding that end,
    until pycr exits. Say what the tree then meets."""
    fds = ((str(rec.type), rec.flags, rec.pipe_id) for p in images.processes for rec in p.fds)
    inherited = dict(options.current().inherit_fds)
    for pipe_id, missing in lonely_pipe_ends(fds).items():
        if f"pipe:[{pipe_id}]" in inherited:
            continue                # its other end is the pipe of pycr's fd (--inherit-fd)
        log.warning("pipe:[%d] has no %s in the restored tree; once pycr exits %s (--inherit-fd "
                    "fd[N]:pipe:[%d] gives it pycr's pipe N instead)", pipe_id, missing, PIPE_OUTLOOK[missing],
                    pipe_id)


def check_addresses(images):
    """A TCP or UDP socket bound to one address needs that address here (another host may lack it)."""
    body = images.objects.get("inetsk")
    if body is not None:
        from pycr.restore import inetsk     # imported only for a set that has sockets
        inetsk.check_here(body)


def check_terminals(images):
    """Every pty the tree holds gets its index back (programs keep /dev/pts/N by name): a taken one
    is refused now, not when the descriptions are opened (for a migration's replica: at its final
    pass). A local migration takes the source's own ptys instead (restore.handover)."""
    body = images.objects.get("tty")
    if body is None:
        return
    from pycr.restore import handover, tty
    if handover.active():
        return
    for p in body.ptys:
        if p.inherited:                 # a shell job's terminal: pycr's own becomes it (-j)
            continue
        name = f"{tty.PTS_DIR}/{p.index}"
        if os.path.exists(name):
            raise RestoreError(f"{name} is in use: the restored pty needs that name back (programs keep it)")


def check_cpu(images):
    """Every thread's extended state fits this CPU, and every permission the
    process had (AMX) can be granted here; one line naming what differs."""
    layout, here = images.cpu_layout, X.local_layout()
    for p in images.processes:
        try:
            X.check_components(p.core.xcomp_perm, "the permission it had (ARCH_REQ_XCOMP_PERM)")
            for th in p.core.threads:
                if th.xstate:
                    if len(th.xstate) != layout.size:
                        raise PycrError(f"its xstate is {len(th.xstate)} bytes, the inventory says "
                                        f"{layout.size}")
                    X.convert(th.xstate, layout, here)
        except PycrError as exc:
            raise RestoreError(f"pid {p.pid}: {exc}") from None


def check_vdso(images):
    """The dumped [vvar]/[vdso] must have this kernel's sizes and spacing: the
    restore moves this kernel's vdso to the dumped address, it cannot reshape it."""
    mine = {v.kind: v for v in proc.maps(os.getpid()) if v.kind in mm.SPECIAL}
    for p in images.processes:
        want = {mm.kind_of(v): v for v in p.mm.vmas if mm.kind_of(v) in mm.SPECIAL}
        if not want or "vdso" not in want or "vdso" not in mine:
            continue
        for kind, v in want.items():
            have = mine.get(kind)
            if have is None or v.end - v.start != have.size or \
                    v.start - want["vdso"].start != have.start - mine["vdso"].start:
                raise RestoreError(f"pid {p.pid}: the dumped [{kind}] ({(v.end - v.start) // 1024} KiB) does not "
                                   f"match this kernel's vdso layout: restore on a kernel with the same vdso")


def check(images, pidns, pids_advice=PIDS_TAKEN):
    check_cpu(images)
    check_vdso(images)
    if not pidns:
        check_pids(images, pids_advice)
    for p in images.processes:
        process.check_rlimits(p.pid, p.core)
        mm.check_vmas(p.pid, p.mm)
    check_files(images)
    check_addresses(images)
    check_terminals(images)
    check_pipes(images)
