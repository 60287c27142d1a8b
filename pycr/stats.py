"""--display-stats: where a command's time goes, phase by phase, and what it moved.

criu prints its phases and counters after a dump or restore; pycr does the same
so that each optimisation can be chosen by measurement. Code marks its phases:

    with stats.phase("page copy"):
        ...
    stats.count("pages written", n)

and a caller collects them around a command (the CLI's --display-stats, or the
Python API):

    with stats.collecting("dump") as st:
        dump_tree(...)
    print(st.format())

Times are time.perf_counter() spans, exclusive of the phases nested inside
(an image written during the page copy counts as image write only), so the
phases never add up to more than the wall time; what no phase covers is
shown as "other". Off (no collecting block), a phase is one global lookup and
a shared do-nothing context: no clock is read. Phases are measured in the
thread that runs the command; nesting is tracked per thread.
"""

import contextlib
import os
import threading
import time

#: The phases each command reports, in the order it meets them (all are printed,
#: 0 when a run did not need one). Phases not listed here are printed after them.
_DUMP = ("interpreter start", "imports", "freeze", "tracker", "/proc reads", "registers", "injections",
         "page copy", "image write", "release", "waiting for PIDs to be free")
PHASES = {
    "dump": _DUMP,              # "tracker": incremental passes only (pre-dump, --prev-images-dir)
    "pre-dump": _DUMP,
    "restore": ("interpreter start", "imports", "image load and checks", "task creation", "mappings",
                "page fill", "files", "process state", "registers", "detach"),
}

COUNTERS = {
    "dump": ("processes", "threads", "pages scanned", "pages written", "pages skipped (in parent)",
             "image bytes"),
    "restore": ("processes", "pages filled"),
}
COUNTERS["pre-dump"] = COUNTERS["dump"]

_current = None         # the Stats being collected, or None


class Stats:
    """Seconds per phase and counters of one command."""

    def __init__(self, command, started=None, process_start=None):
        self.command = command
        self.started = time.perf_counter() if started is None else started
        self.ended = None
        self.phases = {}                    # name -> seconds, exclusive of nested phases
        self.counters = {}
        self._stacks = {}                   # thread id -> open _Phase objects
        if process_start is not None:       # seconds the interpreter ran before `started`
            self.phases["interpreter start"] = process_start
            self.started -= process_start

    def add(self, name, seconds):
        self.phases[name] = self.phases.get(name, 0.0) + seconds

    def done(self):
        """The command's work is over (what follows, e.g. waiting for a restored root, is not timed)."""
        if self.ended is None:
            self.ended = time.perf_counter()

    @property
    def total(self):
        return (self.ended if self.ended is not None else time.perf_counter()) - self.started

    def as_dict(self):
        """{"phases": {name: s}, "counters": {...}, "total_s": s} (every listed phase present)."""
        phases = {name: 0.0 for name in PHASES.get(self.command, ())}
        phases.update(self.phases)
        total = self.total
        phases["other"] = max(total - sum(phases.values()), 0.0)
        counters = {name: 0 for name in COUNTERS.get(self.command, ())}
        counters.update(self.counters)
        return {"command": self.command, "phases": phases, "counters": counters, "total_s": total}

    def format(self):
        """criu's --display-stats layout: "<phase> time: N us" lines, then the counters."""
        d = self.as_dict()
        what = "restore" if self.command == "restore" else "dump"
        lines = [f"Displaying {what} stats:"]
        lines += [f"{_cap(name)} time: {round(s * 1e6)} us" for name, s in d["phases"].items()]
        lines.append(f"Total time: {round(d['total_s'] * 1e6)} us")
        lines += [f"{_cap(name)}: {value}" for name, value in d["counters"].items()]
        return "\n".join(lines)


def _cap(name):
    return name[:1].upper() + name[1:]


class _Phase:
    __slots__ = ("stats", "name", "t0", "inner")

    def __init__(self, stats, name):
        self.stats, self.name, self.inner = stats, name, 0.0

    def __enter__(self):
        self.stats._stacks.setdefault(threading.get_ident(), []).append(self)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        elapsed = time.perf_counter() - self.t0
        stack = self.stats._stacks[threading.get_ident()]
        stack.pop()
        self.stats.add(self.name, elapsed - self.inner)
        if stack:
            stack[-1].inner += elapsed
        return False


_OFF = contextlib.nullcontext()


def phase(name):
    """A context manager that times the block as `name` while stats are collected."""
    st = _current
    return _OFF if st is None else _Phase(st, name)


def count(name, value):
    """Add value to the counter `name` while stats are collected."""
    st = _current
    if st is not None:
        st.counters[name] = st.counters.get(name, 0) + value


def done():
    """The running command's timed work is over (see Stats.done)."""
    if _current is not None:
        _current.done()


def active():
    return _current is not None


def current():
    """The Stats being collected, or None (a caller that reads phases as they grow: pycr.migrate.converge)."""
    return _current


@contextlib.contextmanager
def collecting(command, started=None, since_process_start=False):
    """Collect the phases and counters of the block -> Stats.

    started: the time.perf_counter() the command began (default: now).
    since_process_start: also count the time from this process's start to
    `started` as "interpreter start" (see process_age).
    """
    global _current
    before = _current
    started = time.perf_counter() if started is None else started
    age = process_age(started) if since_process_start else None
    _current = Stats(command, started, age)
    try:
        yield _current
    finally:
        _current.done()
        _current = before


def process_age(at):
    """Seconds from this process's start (fork) to the perf_counter() time `at`.

    The kernel gives the start only in clock ticks (field 22 of /proc/self/stat,
    since boot), truncated, so now - start overstates the age by less than one
    tick. The figure is the lower bound max(that - 1 tick, CPU time used so far):
    never more than the true age, at most one tick (10 ms at USER_HZ 100) less.
    """
    with open("/proc/self/stat", "rb") as f:
        data = f.read()
    now_perf = time.perf_counter()
    boot_now = time.clock_gettime(time.CLOCK_BOOTTIME)
    tick = 1.0 / os.sysconf("SC_CLK_TCK")
    start = int(data[data.rindex(b")") + 2:].split()[19]) * tick
    by_ticks = boot_now - (now_perf - at) - start - tick
    cpu = time.process_time() - max(now_perf - at, 0.0)
    return max(by_ticks, cpu, 0.0)
