"""timerfd.img: clock, settings, time left and unread expirations of every timerfd of the tree."""

from construct import Struct

from .common import U32, U64, Array32

MAGIC = b"PYCJ"
FILE_NAME = "timerfd.img"

Timerfd = Struct(
    "file_id" / U32,            # the open file description, as in files.img
    "clockid" / U32,            # CLOCK_REALTIME, _MONOTONIC, _BOOTTIME, _REALTIME_ALARM, _BOOTTIME_ALARM
    "settime_flags" / U32,      # TFD_TIMER_ABSTIME, TFD_TIMER_CANCEL_ON_SET
    "ticks" / U64,              # expirations not read yet
    "value_ns" / U64,           # time to the next expiration at the dump; 0 = disarmed
    "interval_ns" / U64,        # period; 0 = one-shot
    "expires_ns" / U64,         # the next expiration on the timer's clock (absolute); 0 = disarmed
)

Body = Struct(
    "timerfds" / Array32(Timerfd),
)
