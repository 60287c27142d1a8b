"""/proc/PID/timers: the POSIX timers (timer_create) of a process.

Each timer is four lines (Linux 3.10+, CONFIG_CHECKPOINT_RESTORE):

    ID: 0
    signal: 14/00007ffd1c2e3a40        (signo / sigev_value, hex)
    notify: signal/pid.1234            (signal | none | thread, then pid. or tid.)
    ClockID: 1

The time left and the interval are not there: a dump asks timer_gettime.
"""

from dataclasses import dataclass

from pycr.abi import SIGEV_NONE, SIGEV_SIGNAL, SIGEV_THREAD, SIGEV_THREAD_ID
from pycr.errors import PycrError
from pycr.proc._read import read_text

NOTIFY = {"signal": SIGEV_SIGNAL, "none": SIGEV_NONE, "thread": SIGEV_THREAD}


@dataclass
class PosixTimer:
    id: int
    signo: int
    sigval: int          # sigev_value as the kernel keeps it (a pointer or an int)
    notify: int          # sigev_notify: SIGEV_SIGNAL/NONE/THREAD, | SIGEV_THREAD_ID when aimed at a thread
    target: int          # the pid (process-wide) or tid (SIGEV_THREAD_ID) the signal goes to
    clock: int           # clockid_t; negative for a CPU-time clock


def parse_timers(text):
    """[PosixTimer] from the text of /proc/PID/timers (in the kernel's order)."""
    out, cur = [], {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        cur[key.strip()] = value.strip()
        if key.strip() == "ClockID":
            try:
                signo, sigval = cur["signal"].split("/")
                how, target = cur["notify"].split("/")
                kind, num = target.split(".")
                notify = NOTIFY[how] | (SIGEV_THREAD_ID if kind == "tid" else 0)
                out.append(PosixTimer(int(cur["ID"]), int(signo), int(sigval, 16), notify, int(num),
                                      int(cur["ClockID"])))
            except (KeyError, ValueError) as exc:
                raise PycrError(f"/proc/PID/timers: cannot parse {cur!r}: {exc}") from None
            cur = {}
    return out


def timers(pid):
    return parse_timers(read_text(pid, "timers"))
