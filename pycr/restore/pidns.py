"""--pidns: restoring into a new PID namespace, under a stub acting as its PID 1.

The init stub is started by pycr with CLONE_NEWPID (it becomes PID 1 there,
reaps orphans, and exits once its last child is gone, which ends the namespace); the restored root is forked inside it with clone3
set_tid, so every restored task gets its dumped PID in the new namespace
while pycr keeps seeing the outer PIDs.

pycr holds the init stub only while it builds the tree: once the tree runs,
init is detached like every restored task (release_init), so it reaps the
namespace's orphans from the start and nothing of the namespace depends on
pycr staying alive (no PTRACE_O_EXITKILL left on any task). To report the
root's exit status, release_init tells the stub the root's PID and a slot in
its own stack: the stub stores the root's status there when it reaps it, and
exits with it when the namespace ends. pycr waits for the root with a pidfd
and reads the slot through /proc/PID/mem (wait_root), or takes init's exit
status if the namespace has ended by then.
"""

import errno
import os
import select
import struct
import time

from pycr import proc
from pycr.abi import CLONE_NEWPID
from pycr.errors import PycrError, RestoreError, TaskGone
from pycr.log import log
from pycr.native import core
from pycr.restore import files, tasks


def start_init(created, keep_fd, need_suspend=True):
    """Start the PID 1 stub of a new PID namespace and seize it -> tasks.Task."""
    try:
        real = core.clone3_exec([], CLONE_NEWPID, core.stub_path(), ["pycr-stub", "init"])
    except OSError as exc:
        if exc.errno == errno.EPERM:
            raise RestoreError("--pidns: creating a PID namespace needs CAP_SYS_ADMIN") from None
        raise RestoreError(f"cannot create a PID namespace: {exc.strerror}") from None
    created.append(real)
    remote = tasks.seize_stub(real, 1, syscalls=(tasks.SYS_WAIT4, tasks.SYS_NANOSLEEP),
                              need_suspend=need_suspend)
    # It inherited pycr's descriptors (a caller may wait for EOF on them);
    # only pycr's pidfd stays, for the restored tasks forked from it.
    files.close_inherited(remote, keep_fd)
    task = tasks.Task(1, real, remote)
    log.info("--pidns: init stub is pid %d outside, 1 inside", real)
    return task


SLOT_BELOW_SP = 256        # the status slot: in init's stack, which the stub itself never uses


def release_init(init, root_pid):
    """Detach the init stub for good, telling it the root's PID (inside the namespace)
    and where to leave the root's status: see the stub's comment (pycr/native/stub.S)."""
    r = init.remote
    r.finish()
    t = r.thread
    regs = t.get_regs()
    slot = (regs.rsp - SLOT_BELOW_SP) & ~15
    fd = proc.open_mem(init.real, write=True)
    try:
        os.pwrite(fd, bytes(12), slot)
    finally:
        os.close(fd)
    regs.r13 = root_pid
    regs.r14 = slot
    if regs.orig_rax == tasks.SYS_WAIT4:    # stopped in wait4: restarted with these arguments
        regs.rsi = slot
    t.set_regs(regs)
    t.detach(0)
    init.slot = slot
    log.info("--pidns: init stub %d detached; it keeps pid %d's status at %#x", init.real, root_pid, slot)


def _read_slot(init):
    """The root's status (shell style) from init's slot, or None if not there (yet)."""
    try:
        data = proc.read_mem(init.real, init.slot, 12)
    except PycrError:
        return None
    if len(data) != 12:
        return None
    code, done = struct.unpack_from("<iI", data, 4)
    return code if done == 1 else None


def _shell_status(status):
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def wait_root(init, root, alone_timeout=2.0):
    """Wait for the restored root to exit -> its status as a shell reports it (code or
    128 + signal). Neither the root nor init is traced: a pidfd says when the root has
    gone, init's slot (or init's own exit status) says how."""
    try:
        pidfd = core.pidfd_open(root.real)
    except OSError:
        pidfd = None            # gone already
    if pidfd is not None:
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            while not poller.poll(1000):
                pass
        finally:
            os.close(pidfd)
    init_fd = core.pidfd_open(init.real)     # our child: a zombie still has one
    try:
        poller = select.poll()
        poller.register(init_fd, select.POLLIN)
        code = None
        while code is None:
            code = _read_slot(init)
            if code is not None:
                break
            res = os.waitid(os.P_PIDFD, init_fd, os.WEXITED | os.WNOHANG)
            if res is not None:          # the namespace ended: init exited with the root's code
                return res.si_status if res.si_code == os.CLD_EXITED else 128 + res.si_status
            poller.poll(10)
        # Nothing left in the namespace: init exits at once; reap it (it is pycr's
        # child) rather than leave a zombie for PID 1 to find later.
        if not _has_children(init.real):
            deadline = time.monotonic() + alone_timeout
            while time.monotonic() < deadline:
                if os.waitid(os.P_PIDFD, init_fd, os.WEXITED | os.WNOHANG) is not None:
                    break
                poller.poll(10)
        return code
    except ChildProcessError:
        if code is None:
            raise PycrError(f"the namespace's init (pid {init.real}) was reaped by someone else") from None
        return code
    finally:
        os.close(init_fd)


def _has_children(real):
    try:
        return bool(proc.children(real))
    except TaskGone:
        return False
