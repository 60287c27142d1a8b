"""timerfd: clock, settings, time left and expirations not read yet.

fdinfo says `ticks` and `it_value`, but a periodic timer that expired is
forwarded only when it is read, so fdinfo shows ticks 1 and it_value 0 however
many periods went by. timerfd_gettime() on pycr's copy of the description does
that forwarding the way a read would (ticks gets the missed periods, it_value
the time to the next one) without taking anything: the program's next read
returns what it would have. The absolute time of the next expiration is taken
on the timer's clock for TFD_TIMER_ABSTIME timers, which re-arm at that time.
"""

import ctypes
import os
import time

from .. import abi, proc
from ..abi import NR
from ..errors import Unsupported
from ..native import core

TYPE = "timerfd"
IMAGE = "timerfd"
NS = 1_000_000_000
READ_CLOCK = {abi.CLOCK_REALTIME_ALARM: abi.CLOCK_REALTIME, abi.CLOCK_BOOTTIME_ALARM: abi.CLOCK_BOOTTIME}


class Itimerspec(ctypes.Structure):
    _fields_ = [("interval_sec", ctypes.c_long), ("interval_nsec", ctypes.c_long),
                ("value_sec", ctypes.c_long), ("value_nsec", ctypes.c_long)]


def matches(pid, fd, target, st):
    return target == "anon_inode:[timerfd]"


def gettime(fd):
    """(ns to the next expiration, interval ns) of a timerfd of pycr's."""
    its = Itimerspec()
    core.syscall(NR["timerfd_gettime"], fd, ctypes.addressof(its))
    return its.value_sec * NS + its.value_nsec, its.interval_sec * NS + its.interval_nsec


def _fields(pid, fd):
    extra = proc.fdinfo(pid, fd).extra
    try:
        return int(extra["clockid"][0]), int(extra["ticks"][0]), int(extra["settime flags"][0], 8)
    except (KeyError, IndexError, ValueError):
        raise Unsupported(f"pid {pid} fd {fd}: timerfd without clockid/ticks/settime flags in its fdinfo "
                          "(kernel too old)") from None


def read_one(held):
    mine = core.dup_from(held.pid, held.fd)
    try:
        for _ in range(10):
            value, interval = gettime(mine)
            clockid, ticks, flags = _fields(held.pid, held.fd)
            now = time.clock_gettime_ns(READ_CLOCK.get(clockid, clockid))
            again, _ = gettime(mine)
            if again <= value:          # no expiration between the two reads: ticks and value agree
                break
        else:
            raise Unsupported(f"pid {held.pid} fd {held.fd}: timerfd expires too often to be read steadily")
    finally:
        os.close(mine)
    if clockid not in abi.TIMERFD_CLOCKS:
        raise Unsupported(f"pid {held.pid} fd {held.fd}: timerfd on clock {clockid} is not supported")
    return {"file_id": held.file_id, "clockid": clockid, "settime_flags": flags, "ticks": ticks,
            "value_ns": value, "interval_ns": interval, "expires_ns": now + value if value else 0}


def collect(objects):
    return {"timerfds": [read_one(held) for held in objects]}
