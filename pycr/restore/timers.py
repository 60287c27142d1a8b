"""Interval and POSIX timers, armed again late in the restore (just before the registers).

Both are armed with the time that was left at the dump, relative to now: the
time the tree spent stopped does not count. POSIX timers keep their IDs (the
program holds them as timer_t): PR_TIMER_CREATE_RESTORE_IDS makes timer_create
take the ID from *timerid (Linux 6.17); without it the kernel's sequential
allocation is walked with placeholder timers.
"""

import ctypes
import os
import struct

from pycr.abi import (ITIMER_PROF, ITIMER_REAL, ITIMER_VIRTUAL, PR_TIMER_CREATE_RESTORE_IDS,
                      PR_TIMER_CREATE_RESTORE_IDS_GET, PR_TIMER_CREATE_RESTORE_IDS_OFF, PR_TIMER_CREATE_RESTORE_IDS_ON,
                      SIGEV_NONE, SIGEV_THREAD_ID)
from pycr.errors import ImageError, RestoreError
from pycr.log import log

ITIMERVAL = struct.Struct("<qqqq")      # it_interval (sec, usec), it_value (sec, usec)
ITIMERSPEC = struct.Struct("<qqqq")     # it_interval (sec, nsec), it_value (sec, nsec)
SIGEVENT = struct.Struct("<Qiii44x")    # sigev_value, sigev_signo, sigev_notify, _tid; 64 bytes
ITIMER_NAMES = {ITIMER_REAL: "ITIMER_REAL", ITIMER_VIRTUAL: "ITIMER_VIRTUAL", ITIMER_PROF: "ITIMER_PROF"}
TIME_MAX_US = 1 << 62
TIME_MAX_NS = 1 << 62
ID_MAX = (1 << 31) - 1
NSIG = 64
#: How far past the IDs it has the kernel may be walked with placeholders (without the prctl).
PLACEHOLDERS_MAX = 4096

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def restore_ids_supported():
    """Does this kernel have PR_TIMER_CREATE_RESTORE_IDS? (asked of pycr's own process: GET changes nothing)"""
    return _libc.prctl(PR_TIMER_CREATE_RESTORE_IDS, PR_TIMER_CREATE_RESTORE_IDS_GET, 0, 0, 0) >= 0


# ---------------------------------------------------------------- load-time checks

def check_itimers(path, core):
    for which, t in enumerate(core.itimers):
        if t.value_us >= TIME_MAX_US or t.interval_us >= TIME_MAX_US:
            raise ImageError(path, f"corrupt: {ITIMER_NAMES[which]} of {t.value_us}/{t.interval_us} us is out of range")


def check_posix_timers(path, body, processes):
    """Every entry names a process of the set once; IDs unique; threads its own; values in range."""
    by_pid = {p.pid: p for p in processes}
    seen = set()
    for entry in body.processes:
        p = by_pid.get(entry.pid)
        if p is None or entry.pid in seen:
            raise ImageError(path, f"corrupt: pid {entry.pid} is not a process of pstree.img or is listed twice")
        seen.add(entry.pid)
        ids = set()
        for t in entry.timers:
            what = f"pid {entry.pid} timer {t.id}"
            if t.id > ID_MAX or t.id in ids:
                raise ImageError(path, f"corrupt: {what}: ID listed twice or above {ID_MAX}")
            ids.add(t.id)
            if t.notify & ~SIGEV_THREAD_ID > 2 or (t.notify & ~SIGEV_THREAD_ID != SIGEV_NONE
                                                     and not 1 <= t.signo <= NSIG):
                raise ImageError(path, f"corrupt: {what}: notify {t.notify} signal {t.signo}")
            if t.notify & SIGEV_THREAD_ID and t.tid not in p.tids:
                raise ImageError(path, f"corrupt: {what}: thread {t.tid} is not a thread of pid {entry.pid}")
            if t.value_ns >= TIME_MAX_NS or t.interval_ns >= TIME_MAX_NS:
                raise ImageError(path, f"corrupt: {what}: time {t.value_ns}/{t.interval_ns} ns out of range")


# ---------------------------------------------------------------- in the task

def set_itimers(remote, core):
    """setitimer for each armed interval timer, with the time left at the dump."""
    for which, t in enumerate(core.itimers):
        # value 0 with an interval: it expired while frozen and its SIGALRM is pending;
        # the kernel (6.13+) re-arms it when that signal is dequeued, which a re-queued
        # signal no longer does: arm it for one interval from now instead.
        value = t.value_us or t.interval_us
        if not value:
            continue
        val = ITIMERVAL.pack(t.interval_us // 1_000_000, t.interval_us % 1_000_000,
                             value // 1_000_000, value % 1_000_000)
        remote.check("setitimer", which, remote.put(val), 0, what=ITIMER_NAMES[which])
        remote.reset_scratch()
        log.info("pid %d: %s armed again with setitimer: %d us left, interval %d us",
                 remote.pid, ITIMER_NAMES[which], value, t.interval_us)


def _sigevent(t):
    return SIGEVENT.pack(t.sigval, t.signo, t.notify, t.tid if t.notify & SIGEV_THREAD_ID else 0)


def _create_with_id(remote, t):
    """timer_create with *timerid preset (the prctl is on): the kernel takes that ID."""
    ev = remote.put(_sigevent(t))
    idp = remote.put(struct.pack("<i", t.id))
    res = remote.call("timer_create", t.clock, ev, idp)
    if res < 0:
        raise RestoreError(f"pid {remote.pid}: timer_create of POSIX timer {t.id} (clock {t.clock}) failed: "
                           f"{os.strerror(-res)}")


def _create_in_order(remote, timers):
    """Without the prctl: create timers in increasing ID order; a timer that got an ID
    below the wanted one stays (disarmed) as a placeholder until all are made, so the
    kernel hands out the next ID, whether it allocates in sequence or the lowest free one."""
    placeholders = []
    try:
        for t in timers:
            while True:
                idp = remote.put(struct.pack("<i", 0))
                remote.check("timer_create", t.clock, remote.put(_sigevent(t)), idp, what=f"POSIX timer {t.id}")
                (got,) = struct.unpack("<i", remote.read(idp, 4))
                remote.reset_scratch()
                if got == t.id:
                    break
                placeholders.append(got)
                if got > t.id or len(placeholders) > PLACEHOLDERS_MAX:
                    raise RestoreError(f"pid {remote.pid}: POSIX timer {t.id} cannot get its ID back: this kernel "
                                       f"has no PR_TIMER_CREATE_RESTORE_IDS and handed out ID {got}")
    finally:
        for ph in placeholders:
            remote.call("timer_delete", ph)


def create_posix_timers(remote, timers, restore_ids=None):
    """Create every POSIX timer of a process with its ID, then arm it with the time left."""
    if not timers:
        return
    restore_ids = restore_ids_supported() if restore_ids is None else restore_ids
    if restore_ids and remote.call("prctl", PR_TIMER_CREATE_RESTORE_IDS, PR_TIMER_CREATE_RESTORE_IDS_ON,
                                   0, 0, 0) < 0:
        log.info("pid %d: PR_TIMER_CREATE_RESTORE_IDS refused (it needs CAP_CHECKPOINT_RESTORE): "
                 "timers are created in ID order", remote.pid)
        restore_ids = False
    if restore_ids:
        try:
            for t in timers:
                _create_with_id(remote, t)
                remote.reset_scratch()
        finally:
            remote.check("prctl", PR_TIMER_CREATE_RESTORE_IDS, PR_TIMER_CREATE_RESTORE_IDS_OFF, 0, 0, 0,
                         what="PR_TIMER_CREATE_RESTORE_IDS, OFF")
    else:
        _create_in_order(remote, sorted(timers, key=lambda t: t.id))
    for t in timers:
        if t.value_ns:
            spec = ITIMERSPEC.pack(t.interval_ns // 1_000_000_000, t.interval_ns % 1_000_000_000,
                                   t.value_ns // 1_000_000_000, t.value_ns % 1_000_000_000)
            remote.check("timer_settime", t.id, 0, remote.put(spec), 0, what=f"POSIX timer {t.id}")
            remote.reset_scratch()
    log.info("pid %d: %d POSIX timers made again with their IDs (%s) and armed with timer_settime",
             remote.pid, len(timers), "PR_TIMER_CREATE_RESTORE_IDS" if restore_ids else "created in ID order")
