"""Interval timers (setitimer) and POSIX timers (timer_create) of a frozen process.

Neither has a /proc file with its time left: /proc/PID/timers lists the POSIX
timers' IDs, signals and clocks only. Both are read by injecting the getters
(getitimer, timer_gettime, timer_getoverrun) into the frozen task; they change
nothing the task can see.
"""

import os
import struct

from .. import proc
from ..abi import ITIMER_PROF, ITIMER_REAL, ITIMER_VIRTUAL, NR, SIGEV_THREAD_ID
from ..log import log

ITIMERVAL = struct.Struct("<qqqq")      # it_interval (sec, usec), it_value (sec, usec)
ITIMERSPEC = struct.Struct("<qqqq")     # it_interval (sec, nsec), it_value (sec, nsec)
ITIMERS = (ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF)


def collect_itimers(injector):
    """[{value_us, interval_us}] of ITIMER_REAL, VIRTUAL and PROF, by injected getitimer."""
    out = []
    with injector.scratch(ITIMERVAL.size) as buf:
        for which in ITIMERS:
            injector.check(NR["getitimer"], which, buf)
            isec, iusec, vsec, vusec = ITIMERVAL.unpack(injector.read(buf, ITIMERVAL.size))
            out.append({"value_us": vsec * 1_000_000 + vusec, "interval_us": isec * 1_000_000 + iusec})
    return out


def has_timers_file():
    """/proc/PID/timers exists (CONFIG_CHECKPOINT_RESTORE kernels)."""
    return os.path.exists("/proc/self/timers")


def collect_posix_timers(pid, src, injector):
    """The POSIX timers of process pid (read through its live thread src), by increasing ID."""
    if not has_timers_file():
        log.warning("pid %d: this kernel has no /proc/PID/timers: its POSIX timers, if any, are not taken", pid)
        return []
    listed = proc.timers(src)
    out = []
    with injector.scratch(ITIMERSPEC.size) as buf:
        for t in sorted(listed, key=lambda t: t.id):
            injector.check(NR["timer_gettime"], t.id, buf)
            isec, insec, vsec, vnsec = ITIMERSPEC.unpack(injector.read(buf, ITIMERSPEC.size))
            overrun = injector.check(NR["timer_getoverrun"], t.id)
            out.append({
                "id": t.id, "clock": t.clock, "notify": t.notify, "signo": t.signo, "sigval": t.sigval,
                "tid": t.target if t.notify & SIGEV_THREAD_ID else 0,
                "value_ns": vsec * 1_000_000_000 + vnsec, "interval_ns": isec * 1_000_000_000 + insec,
                "overrun": overrun,
            })
    if out:
        log.info("pid %d: %d POSIX timers read (/proc/PID/timers, injected timer_gettime)", pid, len(out))
    return out
