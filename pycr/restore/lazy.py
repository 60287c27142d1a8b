"""`pycr restore --lazy-pages`: the restore's half of post-copy (the daemon is pycr/lazy/).

Anonymous private memory with saved pages is left empty; every other page is
filled as usual. For each process, right after its address space is built,
the task makes a userfaultfd (injected, without UFFD_USER_MODE_ONLY so that
the kernel's own accesses, a read() into a missing page, are served too),
pycr takes it with pidfd_getfd and closes it in the task, enables the events
(fork, remap, remove, unmap) and registers MISSING on those VMAs, then hands
it to the lazy-pages daemon with a pidfd of the task. From then on any first
touch of a page faults to the daemon; nothing else is needed for the stack
or any page the first instruction uses. "go" before the release checks the
daemon is still there.
"""

import fcntl
import os
import socket
import struct

from pycr import manifest
from pycr.abi import (O_CLOEXEC, O_NONBLOCK, UFFD_API, UFFD_LAZY_FEATURES, UFFDIO_API, UFFDIO_REGISTER,
                      UFFDIO_REGISTER_MODE_MISSING)
from pycr.errors import KernelFeatureMissing, RestoreError
from pycr.images import iter_page_runs
from pycr.lazy import protocol
from pycr.log import log
from pycr.native import core
from pycr.sysinfo import page_size

PAGE = page_size()
LAZY_KINDS = ("anon", "heap", "stack")


def lazy_ranges(mm, chain, owner):
    """[(start, end, wipe_on_fork)] of the VMAs whose saved pages are served on fault: private
    anonymous ones (not MAP_DROPPABLE, which userfaultfd refuses; not mlocked, which the
    restore's own mlock would fault in at once) holding at least one saved page."""
    saved = sorted((v, v + n * PAGE) for v, n, _, _ in iter_page_runs(chain.pagemap(0, owner)))
    out = []
    for vma in mm.vmas:
        if not is_lazy_vma(vma.shared, vma.kind, vma.vmflags):
            continue
        if any(s < vma.end and vma.start < e for s, e in saved):
            out.append((vma.start, vma.end, "wf" in vma.vmflags.split()))
    return out


def is_lazy_vma(shared, kind, vmflags):
    """Whether a VMA's saved pages are served on fault (the same rule for a lazy dump's source)."""
    flags = vmflags.split()
    return not shared and str(kind) in LAZY_KINDS and "dp" not in flags and "lo" not in flags


def make_uffd(remote):
    """A userfaultfd made in the task, as pycr's own fd (the task's fd table left as it was)."""
    got = remote.call("userfaultfd", O_CLOEXEC | O_NONBLOCK)
    if got < 0:
        raise KernelFeatureMissing("userfaultfd", f"pid {remote.pid}: userfaultfd(): {os.strerror(-got)}")
    try:
        return core.dup_from(remote.real, got)
    finally:
        remote.call("close", got)


def enable(uffd, pid, ranges):
    """UFFDIO_API with the lazy events, then UFFDIO_REGISTER MISSING on every range."""
    arg = bytearray(struct.pack("<QQQ", UFFD_API, UFFD_LAZY_FEATURES, 0))
    try:
        fcntl.ioctl(uffd, UFFDIO_API, arg, True)
    except OSError as exc:
        raise KernelFeatureMissing("userfaultfd events", f"UFFDIO_API with fork/remap/remove/unmap "
                                                         f"events: {exc.strerror}") from None
    for start, end, _ in ranges:
        reg = bytearray(struct.pack("<QQQQ", start, end - start, UFFDIO_REGISTER_MODE_MISSING, 0))
        try:
            fcntl.ioctl(uffd, UFFDIO_REGISTER, reg, True)
        except OSError as exc:
            raise RestoreError(f"pid {pid}: UFFDIO_REGISTER MISSING {start:#x}-{end:#x}: {exc.strerror}") from None


class LazyLink:
    """The restore's connection to `pycr lazy-pages`, made before any task exists."""

    def __init__(self, images_dir, work_dir):
        path = protocol.socket_path(work_dir)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            with protocol.addressable(path) as name:
                self.sock.connect(name)
        except OSError as exc:
            self.sock.close()
            raise RestoreError(f"no lazy-pages daemon at {path} ({exc.strerror}): start `pycr lazy-pages "
                               f"-D {images_dir}` first") from None
        set_id = bytes(manifest.read(images_dir).set_id).hex()
        protocol.call(self.sock, {"op": "hello", "set_id": set_id})
        self.served = 0

    def hand_over(self, remote, ranges):
        """Make, register and send the task's uffd; from the daemon's answer on, its faults are served."""
        uffd = make_uffd(remote)
        pidfd = -1
        try:
            enable(uffd, remote.pid, ranges)
            pidfd = core.pidfd_open(remote.real)
            protocol.call(self.sock, {"op": "process", "pid": remote.pid, "real": remote.real,
                                      "runs": [[s, e, w] for s, e, w in ranges]}, [uffd, pidfd])
        finally:
            os.close(uffd)
            if pidfd >= 0:
                os.close(pidfd)
        self.served += 1
        log.info("pid %d: userfaultfd registered MISSING on %d ranges, handed to the lazy-pages daemon",
                 remote.pid, len(ranges))

    def go(self):
        """Just before the release: the daemon is alive and holds every uffd."""
        protocol.call(self.sock, {"op": "go"})
        self.close()

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None
