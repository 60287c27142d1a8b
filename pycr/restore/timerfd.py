"""timerfd: made again by pycr on its clock, re-armed, its unread expirations put back.

A relative timer is armed for the time it had left at the dump (the time the
tree spent dumped does not count, as for a stopped program); a TFD_TIMER_ABSTIME
timer is armed for the same absolute time on its clock, so it fires when it
would have, at once if that time went by. Unread expirations come back with
TFD_IOC_SET_TICKS, which the kernel has only with CONFIG_CHECKPOINT_RESTORE.
"""

import ctypes
import errno
import fcntl
import os

from pycr import abi
from pycr.abi import NR
from pycr.collect.timerfd import NS, Itimerspec
from pycr.errors import ImageError, KernelFeatureMissing, RestoreError
from pycr.log import log
from pycr.native import core
from pycr.restore.kindparts import entries_by_file, ready_for_task

TYPE = "timerfd"
IMAGE = "timerfd"
FLAGS = abi.TFD_TIMER_ABSTIME | abi.TFD_TIMER_CANCEL_ON_SET


def check(path, body, recs):
    entries_by_file(path, body.timerfds, recs, "timerfd")
    for e in body.timerfds:
        if e.clockid not in abi.TIMERFD_CLOCKS or e.settime_flags & ~FLAGS:
            raise ImageError(path, f"corrupt: timerfd {e.file_id} has clock {e.clockid}, flags {e.settime_flags:#o}")
        if max(e.value_ns, e.interval_ns, e.expires_ns) >= 2**63:
            raise ImageError(path, f"corrupt: timerfd {e.file_id} has a time past 2^63 ns")
    if any(e.ticks for e in body.timerfds):
        probe_set_ticks()


def probe_set_ticks():
    """Ask the kernel for TFD_IOC_SET_TICKS on a timerfd of pycr's, before any task exists."""
    fd = core.syscall(NR["timerfd_create"], abi.CLOCK_MONOTONIC, os.O_CLOEXEC)
    try:
        set_ticks(fd, 1)            # 0 is EINVAL where the ioctl exists
    finally:
        os.close(fd)


def set_ticks(fd, ticks):
    """TFD_IOC_SET_TICKS; one line naming the missing kernel option if the kernel lacks it."""
    try:
        fcntl.ioctl(fd, abi.TFD_IOC_SET_TICKS, ticks.to_bytes(8, "little"))
    except OSError as exc:
        if exc.errno == errno.ENOTTY:
            raise KernelFeatureMissing("TFD_IOC_SET_TICKS", "this kernel is built without CONFIG_CHECKPOINT_RESTORE; "
                                       "a timerfd's unread expirations cannot be put back") from None
        raise


def _spec(ns):
    return divmod(ns, NS)


def _arm(fd, e):
    """Arm pycr's timerfd as the dumped one was and put back its unread expirations."""
    if e.value_ns:
        absolute = bool(e.settime_flags & abi.TFD_TIMER_ABSTIME)
        its = Itimerspec(*_spec(e.interval_ns), *_spec(e.expires_ns if absolute else e.value_ns))
        core.syscall(NR["timerfd_settime"], fd, e.settime_flags, ctypes.addressof(its), 0)
    if e.ticks:
        set_ticks(fd, e.ticks)


class Objects:
    def __init__(self, images, body):
        self.entries = {e.file_id: e for e in body.timerfds}

    def open(self, rec):
        e = self.entries[rec.file_id]
        try:
            fd = (core.syscall(NR["timerfd_create"], e.clockid, os.O_CLOEXEC | os.O_NONBLOCK))
        except OSError as exc:
            need = " (an alarm clock needs CAP_WAKE_ALARM)" if exc.errno == errno.EPERM else ""
            raise RestoreError(f"timerfd on clock {e.clockid}: timerfd_create failed: {exc.strerror}{need}") from None
        ready_for_task(fd, rec, lambda fd: _arm(fd, e))
        log.info("timerfd %d: clock %d, %d ns left, every %d ns, %d unread", rec.file_id, e.clockid,
                 e.value_ns, e.interval_ns, e.ticks)
        return fd

    def close(self):
        pass
