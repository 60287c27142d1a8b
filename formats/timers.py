"""timers.img: the POSIX timers (timer_create) of every process of the tree."""

from construct import Int32sl, Struct

from .common import U32, U64, Array32

MAGIC = b"PYCQ"
FILE_NAME = "timers.img"

PosixTimer = Struct(
    "id" / U32,                 # the timer_t the program holds; it keeps it across the restore
    "clock" / Int32sl,          # clockid_t (negative: a CPU-time clock)
    "notify" / U32,             # sigev_notify: SIGEV_SIGNAL 0, SIGEV_NONE 1, SIGEV_THREAD 2, | SIGEV_THREAD_ID 4
    "signo" / U32,              # sigev_signo
    "sigval" / U64,             # sigev_value
    "tid" / U32,                # the thread for SIGEV_THREAD_ID, else 0
    "value_ns" / U64,           # time left at the dump (timer_gettime), 0 = disarmed
    "interval_ns" / U64,        # reload value, 0 = one-shot
    "overrun" / U32,            # timer_getoverrun at the dump
)

Process = Struct(
    "pid" / U32,
    "timers" / Array32(PosixTimer),     # by ID
)

Body = Struct(
    "processes" / Array32(Process),     # only processes that have timers
)
