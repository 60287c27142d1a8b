"""Waiting for tasks to exit and for their PIDs to be freed, on pidfds: blocking, with a timeout.

A pidfd polls readable (POLLIN) once its task has exited (for a process pidfd: once
the whole thread group has), and reports POLLHUP once the pid has no task left, i.e.
the task was reaped and its PID (or TID) is free. Waiters are woken for POLLIN at the
exit; whether they are also woken at the reap (release_task detaching the pid) depends
on the kernel: reap_wakes() finds out once, by experiment. Where it does not, callers
keep their old loop.
"""

import errno
import os
import select
import signal
import threading
import time

from pycr.abi import PIDFD_THREAD, WALL
from pycr.log import log
from pycr.native import core

_reap_wakes = None


def reap_wakes():
    """True if the kernel wakes a pidfd's pollers when its task is reaped.

    The probe: a thread of pycr that exits, its PIDFD_THREAD pidfd in an epoll set
    asking for nothing but POLLHUP (always reported). The exit's wake-up is keyed
    POLLIN and does not ready the item; the thread is reaped at once (a thread is
    released at its exit), so the set reports POLLHUP only if that woke the pidfd's
    wait queue. Without PIDFD_THREAD (before Linux 6.9) the answer is no. Asked once
    per run; costs a thread start."""
    global _reap_wakes
    if _reap_wakes is None:
        _reap_wakes = _probe()
        if not _reap_wakes:
            log.info("pidfd: this kernel does not wake pidfd pollers when a task is reaped; "
                     "waiting for freed PIDs falls back to checking /proc every 2 ms")
    return _reap_wakes


def _probe(patience=1.0):
    tid = []
    started, go = threading.Event(), threading.Event()

    def run():
        tid.append(threading.get_native_id())
        started.set()
        go.wait()

    thread = threading.Thread(target=run, name="pycr-pidfd-probe", daemon=True)
    thread.start()
    started.wait()
    try:
        pidfd = core.pidfd_open(tid[0], PIDFD_THREAD)
    except OSError:
        go.set()
        thread.join()
        return False
    try:
        with select.epoll() as ep:
            ep.register(pidfd, 0)
            go.set()
            thread.join()
            # Reaped now or in a moment (join returns at the thread's CLONE_CHILD_CLEARTID,
            # just before its release): wakes at once where the kernel wakes pollers.
            return any(ev & select.EPOLLHUP for _, ev in ep.poll(patience))
    finally:
        os.close(pidfd)


def open_task(tid):
    """A pidfd for task tid, None if it is gone: a process pidfd for a thread-group
    leader (readable once the whole group has exited, when its parent or tracer can
    wait for it), a PIDFD_THREAD one for another thread (readable at its own exit)."""
    try:
        try:
            return core.pidfd_open(tid, 0)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.EINVAL):   # not a thread-group leader
                raise
            return core.pidfd_open(tid, PIDFD_THREAD)
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            return None
        raise


def wait_reaped(pidfds, timeout):
    """Wait (at most timeout s) until every task of pidfds {pidfd: tid} is reaped; -> the
    tids still there at the timeout (empty: all free). The pidfds stay the caller's.

    One epoll set sleeps until a task exits (POLLIN) or is reaped (POLLHUP: its TID is
    free). Exited tasks are waited for with waitpid(WNOHANG) whenever some task of the set
    has just exited: pycr collects a tracee's exit, and reaps a task whose parent it is,
    which it may become only later, as a child subreaper, when the task's parent dies
    (the kernel hands over the children before that parent's own exit is seen)."""
    deadline = time.monotonic() + timeout
    left = dict(pidfds)
    exited = set()             # tids seen exited, not reaped yet
    with select.epoll() as ep:
        for fd in left:
            ep.register(fd, select.EPOLLIN)
        while left:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            news = False
            for fd, events in ep.poll(remaining):
                tid = left[fd]
                if events & select.EPOLLHUP:        # reaped: the TID is free
                    ep.unregister(fd)
                    del left[fd]
                    exited.discard(tid)
                elif tid not in exited:
                    exited.add(tid)
                    ep.modify(fd, 0)                 # from here only its reap wakes us
                    news = True
            if news:
                for tid in exited:
                    collect_exit(tid)
    return sorted(left.values())


def collect_exit(tid):
    """waitpid(tid, __WALL|WNOHANG) until it reports the exit; False if pycr cannot wait
    for it (yet): not its tracer or parent, or its exit is not reported yet."""
    while True:
        try:
            got, status = os.waitpid(tid, WALL | os.WNOHANG)
        except ChildProcessError:
            return False
        if not got:
            return False
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            return True


def kill_and_wait_exit(pid, timeout):
    """SIGKILL process pid through a pidfd (no PID-reuse race) and wait (at most timeout s)
    until the whole thread group has exited; -> True if it has (or was gone already)."""
    try:
        pidfd = core.pidfd_open(pid)
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            return True
        raise
    try:
        try:
            core.pidfd_send_signal(pidfd, signal.SIGKILL)
        except OSError as exc:
            if exc.errno != errno.ESRCH:        # ESRCH: exited already (a zombie)
                raise
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(max(timeout, 0.0) * 1000))
    finally:
        os.close(pidfd)
