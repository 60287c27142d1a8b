"""/proc/PID/stat: identity, tree links and the mm layout fields.

The comm field may hold spaces and ')' so the line is split at the last ')'.
The current brk is not in this file (only start_brk): the collector gets it by
injecting brk(0) into the task.
"""

from dataclasses import dataclass

from pycr.proc._read import read_text

# Field names after "pid (comm)", in file order (proc(5), fields 3..52).
_FIELDS = (
    "state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt cmajflt "
    "utime stime cutime cstime priority nice num_threads itrealvalue start_time "
    "vsize rss rsslim start_code end_code start_stack kstkesp kstkeip signal "
    "blocked sigignore sigcatch wchan nswap cnswap exit_signal processor "
    "rt_priority policy delayacct_blkio_ticks guest_time cguest_time "
    "start_data end_data start_brk arg_start arg_end env_start env_end exit_code"
).split()


@dataclass
class Stat:
    pid: int
    comm: str
    state: str
    ppid: int
    pgrp: int
    session: int
    tty_nr: int
    tpgid: int
    flags: int
    minflt: int
    cminflt: int
    majflt: int
    cmajflt: int
    utime: int
    stime: int
    cutime: int
    cstime: int
    priority: int
    nice: int
    num_threads: int
    itrealvalue: int
    start_time: int
    vsize: int
    rss: int
    rsslim: int
    start_code: int
    end_code: int
    start_stack: int
    kstkesp: int
    kstkeip: int
    signal: int
    blocked: int
    sigignore: int
    sigcatch: int
    wchan: int
    nswap: int
    cnswap: int
    exit_signal: int
    processor: int
    rt_priority: int
    policy: int
    delayacct_blkio_ticks: int
    guest_time: int
    cguest_time: int
    start_data: int
    end_data: int
    start_brk: int
    arg_start: int
    arg_end: int
    env_start: int
    env_end: int
    exit_code: int


def parse(text):
    """Parse the text of a stat file."""
    head, _, tail = text.rpartition(")")
    pid_s, _, comm = head.partition(" (")
    values = tail.split()
    kw = {"pid": int(pid_s), "comm": comm, "state": values[0]}
    for name, value in zip(_FIELDS[1:], values[1:]):
        kw[name] = int(value)
    for name in _FIELDS[len(values):]:
        kw[name] = 0  # older kernels end earlier
    return Stat(**kw)


def stat(pid, tid=None):
    """The parsed /proc/PID/stat (or /proc/PID/task/TID/stat)."""
    return parse(read_text(pid, "stat", tid))
