"""The source side of convergence: measure each pass, pace it, ask the policy, throttle.

loop.SourcePasses calls, per pass: decide() before taking it, copying()
around the source's work (the copy's own time is the "page copy" phase of
pycr.stats; it also reads the tree's CPU time, about at the pass's freeze),
taken() after it (which sets the throttle the policy aims from the pass's
dirty rate and CPU use, then paces the pass to --bandwidth-limit),
and applied(report) once the replica has it (the replica's "page fill"
phase); frozen() when the final dump holds the tree; close() at the end,
however it ends. A network source feeds the same Policy with its link's
figures instead.

Pacing: a pass with B bytes under a limit of R bytes/s ends no sooner than
B / R after its copy began: pycr sleeps the difference once the pages are
written, before the destination gets them. For a pre-dump the tree runs
meanwhile (and dirties memory, as it would while a slow link carries the
pass); for the final dump it stays frozen (the downtime grows, as it would).
"""

import contextlib
import os
import time

from pycr import proc, stats
from pycr.errors import PycrError, TaskGone
from pycr.log import log
from pycr.migrate.policy import PassFigures
from pycr.migrate.throttle import Throttle

MIB = 1 << 20
_TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root):
    """CPU time of every thread of the tree, in seconds.

    Each thread's schedstat (its run time in ns) where the kernel has it: a tree throttled to 1 % of a
    CPU runs a few ms per pass, under the 10 ms tick of /proc stat's utime + stime, the fallback (which
    also counts the process's threads that exited)."""
    total = 0.0
    try:
        pids = proc.descendants(root)
    except TaskGone:
        return 0.0
    for pid in pids:
        try:
            total += _run_ns(pid) / 1e9 if _SCHEDSTAT else _ticks(pid) / _TICK
        except (TaskGone, FileNotFoundError, ProcessLookupError):
            continue
    return total


def _run_ns(pid):
    total = 0
    for tid in proc.tasks(pid):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def _ticks(pid):
    st = proc.stat(pid)
    return st.utime + st.stime


_SCHEDSTAT = os.path.exists(f"/proc/{os.getpid()}/schedstat")


def _copy_phases():
    st = stats.current()
    return 0.0 if st is None else st.phases.get("page copy", 0.0) + st.phases.get("page fill", 0.0)


class Converger:
    def __init__(self, root, policy):
        self.root = root
        self.policy = policy
        self.throttle = None                # Throttle, made when first needed
        self.percent = 0                    # % in force now
        self.in_force = 0                   # % in force before the last decision
        self.max_percent = 0
        self.pending = None                 # the source's figures of the pass being applied
        self.cpu_mark = (time.monotonic(), tree_cpu_seconds(root))
        self.cores = 0.0                    # CPUs the tree used between the last two decisions
        self.pass_cpu = None                # the tree's CPU seconds when the last pass began (about its freeze)
        self.last_frozen_at = None
        self.missed = False
        self.last_expected = None           # expected downtime when the final dump was decided

    # ------------------------------------------------------------ before a pass

    def decide(self):
        """-> Decision for the next pass; sets the throttle it asks for (before the pass freezes the tree)."""
        self.in_force = self.percent        # over the dirty interval that ends with the next pass's freeze
        now = time.monotonic()
        cpu = tree_cpu_seconds(self.root)
        then, cpu_then = self.cpu_mark
        if now > then:
            self.cores = max(cpu - cpu_then, 0.0) / (now - then)
        self.cpu_mark = (now, cpu)
        decision = self.policy.decide(now)
        limit = self.policy.downtime_limit
        if decision.give_up:
            raise PycrError(f"the downtime budget of {limit * 1000:.0f} ms cannot be met within "
                            f"{self.policy.max_passes} passes (expected {_ms(decision.expected)}): "
                            "the migration stops and the tree goes on")
        if decision.final:
            self.last_expected = decision.expected
            self.missed = decision.missed
            if decision.missed:
                log.warning("warning: pass limit %d reached with an expected downtime of %s, over the %.0f ms "
                            "budget: taking the final dump anyway", self.policy.max_passes,
                            _ms(decision.expected), limit * 1000)
        elif decision.throttle != self.percent:
            self._throttle(decision.throttle)
        log.info("next pass %s: %s (expected downtime %s)", "final" if decision.final else "pre-dump",
                 decision.reason, _ms(decision.expected))
        return decision

    def _throttle(self, percent):
        if self.throttle is None:
            self.throttle = Throttle(self.root, self.policy.base_cores or self.cores)
            log.info("auto-converge: the tree dirties memory faster than the link carries it; "
                     "throttle mechanism: %s", self.throttle.mechanism.detail)
        if percent and self.throttle.set(percent):
            self.percent = percent
            self.max_percent = max(self.max_percent, percent)
        elif not percent:
            self.lift()

    # ------------------------------------------------------------ one pass

    @contextlib.contextmanager
    def copying(self):
        """Around the source's work on one pass: -> a dict that gets its copy seconds."""
        cpu = tree_cpu_seconds(self.root)
        out = {"started": time.monotonic(), "copy0": _copy_phases(), "throttle": self.in_force,
               "cpu": None if self.pass_cpu is None else max(cpu - self.pass_cpu, 0.0)}
        self.pass_cpu = cpu
        yield out
        out["copy"] = _copy_phases() - out["copy0"]

    def taken(self, number, final, nbytes, frozen_at, timing):
        """The source has written pass `number`: pace it, keep its figures for applied()."""
        copy = timing["copy"]
        limit = self.policy.bandwidth_limit
        dirty_seconds = frozen_at - self.last_frozen_at if self.last_frozen_at is not None else 0.0
        figures = PassFigures(number=number, final=final, bytes=nbytes, seconds=0.0, copy_seconds=0.0,
                              frozen_at=frozen_at, dirty_seconds=dirty_seconds,
                              throttle=timing["throttle"],     # in force while these bytes were dirtied
                              bandwidth_limit=limit, cpu_seconds=timing["cpu"])
        aimed = self.policy.throttle_after(figures)           # before the pass is sent: the tree runs meanwhile
        if aimed is not None:
            self.policy.throttle = aimed
            if aimed != self.percent:
                self._throttle(aimed)
            log.info("pass %d dirtied %s in %.3f s using %s CPU s: throttle %d %% (aiming at %s)", number,
                     _mib(nbytes), dirty_seconds, _num(timing["cpu"]), aimed, _rate(self.policy.aim))
        if limit:
            wait = nbytes / limit - copy
            if wait > 0:
                time.sleep(wait)
                copy += wait
                log.info("pass %d paced to %.1f MiB/s: %.3f s more", number, limit / MIB, wait)
        self.last_frozen_at = frozen_at
        figures.seconds, figures.copy_seconds = time.monotonic() - timing["started"], copy
        figures.to_freeze = max(frozen_at - timing["started"], 0.0) if frozen_at else 0.0
        self.pending = figures

    def applied(self, report, link_seconds=0.0):
        """The destination applied the pass: complete its figures, record them, put them in its report.

        link_seconds: the time the pass took on the wire (between two hosts), part of its copy."""
        figures, self.pending = self.pending, None
        if figures is None:
            return
        fill = _copy_phases() - self._fill_mark if hasattr(self, "_fill_mark") else 0.0
        figures.seconds += report.apply_seconds + link_seconds
        figures.copy_seconds += max(fill, 0.0) + link_seconds
        self.policy.record(figures)
        report.bandwidth = figures.bandwidth
        report.dirty_rate = figures.dirty_rate
        report.throttle = figures.throttle
        report.expected_downtime = None if figures.final else self.policy.expected_downtime(time.monotonic())

    def handed_over(self):
        """The set goes to the destination now (the replica's page writes start counting)."""
        self._fill_mark = _copy_phases()

    # ------------------------------------------------------------ the end

    def holding(self):
        """A pass froze the tree: no quota while pycr holds it (a stopped tree needs none, and under it
        a thread would run each syscall pycr injects only when its quota lets it). Relaxed only once
        frozen: relaxed before, the tree would dirty at full speed until its stop."""
        if self.throttle is not None and self.percent:
            self.throttle.relax()

    def thawed(self):
        """A pre-dump thawed the tree: its quota again (relaxed while it was frozen)."""
        if self.throttle is not None and self.percent:
            self.throttle.set(self.percent)

    def frozen(self):
        """The final dump holds the tree frozen: the throttle (relaxed for it) goes."""
        self.lift()

    def lift(self):
        if self.throttle is not None and self.percent:
            self.throttle.lift()
        self.percent = 0

    def close(self):
        if self.throttle is not None:
            self.throttle.lift()
        self.percent = 0

    @property
    def mechanism(self):
        return self.throttle.mechanism.kind if self.throttle is not None else ""


def _mib(nbytes):
    return f"{nbytes / MIB:.1f} MiB"


def _rate(rate):
    return "-" if rate is None else f"{rate / MIB:.1f} MiB/s"


def _num(x):
    return "-" if x is None else f"{x:.3f}"


def _ms(seconds):
    return "unknown" if seconds is None else f"{seconds * 1000:.0f} ms"
