"""--pidns: restoring into a new PID namespace, under a stub acting as its PID 1.

The init stub is started by pycr with CLONE_NEWPID (it becomes PID 1 there,
reaps orphans, and exits once its last child is gone, which ends the namespace); the restored root is forked inside it with clone3
set_tid, so every restored task gets its dumped PID in the new namespace
while pycr keeps seeing the outer PIDs. To report the root's exit status, the
init stub is kept stopped while pycr waits; when the root has exited, pycr
runs wait4 for it inside the init stub and only then lets init reap again.
"""

import errno
import os
import select
import struct
import time

from pycr import proc
from pycr.abi import CLONE_NEWPID, WALL
from pycr.errors import RestoreError, TaskGone
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
    task.keep = False
    log.info("--pidns: init stub is pid %d outside, 1 inside", real)
    return task


def wait_child(init, child):
    """Wait for child (a child of init) to exit; reap it inside init -> wait status."""
    pidfd = core.pidfd_open(child.real)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        while not poller.poll(1000):
            pass
    finally:
        os.close(pidfd)
    r = init.remote
    with r.inj.scratch(4096) as buf:
        r.check("wait4", child.pid, buf, WALL, 0, what=f"{child.pid}")
        (status,) = struct.unpack("<i", r.read(buf, 4))
    r.finish()
    # The stub's own loop did not see this child go: tell it one was reaped,
    # so that it exits (ending the namespace) once no orphan is left to reap.
    regs = r.thread.get_regs()
    regs.r12 = 1
    r.thread.set_regs(regs)
    r.thread.detach(0)
    _reap_if_alone(init)
    return status


def _reap_if_alone(init, timeout=2.0):
    """If no task is left in the namespace, init exits at once: reap it (it is
    pycr's child) rather than leave a zombie for PID 1 to find later."""
    try:
        if proc.children(init.real):
            return
    except TaskGone:
        pass                # init is gone already: reap it below
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(init.real, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            return
        time.sleep(0.002)
