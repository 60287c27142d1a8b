"""`pycr migrate`: the source-side loop, and the whole migration on one machine.

The source is a Transport that makes image sets on demand: pre-dump passes
while the tree runs (each one holds the pages written since the previous),
then, once the delta is small enough or the pass limit is near, the final
dump, taken with the tree kept frozen. The source stays frozen until the
replica runs and is killed only then; if anything fails first it is thawed
and pycr's dirty-page tracking is taken out of it, so it goes on unharmed.

The replica lives in a new PID namespace (the original PIDs are still taken
by the source), with the same PIDs inside it.
"""

import contextlib
import dataclasses
import fcntl
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

from pycr import abi, options, proc, progress, settings, stats
from pycr.abi import UFFD_LINK
from pycr.dump import DumpStats
from pycr.errors import PycrError, TaskGone
from pycr.freeze import freeze
from pycr.images import ImageDir
from pycr.log import log
from pycr.migrate.converge import Converger
from pycr.migrate.follow import follow
from pycr.migrate.policy import DEFAULT_MAX_PASSES, DEFAULT_MIN_DELTA, Policy
from pycr.migrate.report import Summary
from pycr.migrate.transport import Transport
from pycr.native import core
from pycr.predump import dump_incremental
from pycr.restore import handover
from pycr.ptrace.inject import Injector
from pycr.trackers import ParentPass
from pycr.steps import finish

__all__ = ["DEFAULT_MAX_PASSES", "DEFAULT_MIN_DELTA", "Policy", "SourcePasses", "migrate"]


class SourcePasses(Transport):
    """Image sets taken from a live tree on demand: pre-dumps, then a final dump kept frozen."""

    shows_progress = True           # a pass's bar follows the source's copy

    def __init__(self, root, work_dir, tracker="auto", policy=None):
        self.root = root
        self.work_dir = work_dir
        self.tracker = tracker
        # a copy: the policy keeps this migration's pass history
        self.policy = dataclasses.replace(policy, history=[], throttle=0, base_cores=None, aim=None,
                                                  measured=False) if policy is not None else Policy()
        self.converge = Converger(root, self.policy)    # measures, paces, throttles (converge.py)
        self.deltas = []            # bytes of pages each pass copied
        self.previous = None        # the last image set taken
        self.last_pre_dump = None   # the last pre-dump (its tracker images name pycr's uffds)
        self.frozen = None          # FrozenTree of the final dump, until finish()
        self.killed = None          # that tree once SIGKILLed, until its PIDs are free (wait_killed)
        self.frozen_at = None       # time.monotonic() of the final freeze
        self.last_seconds = 0.0
        self.final_taken = False
        self.lazy_final = False     # hybrid migration: the final dump leaves private anonymous pages in the tree
        # early(path, number) -> pages_done for the final pass (its pages files sent on as each is whole)
        self.early = None

    def next_image_set(self, stream=None):
        if self.final_taken:
            raise PycrError("the final dump was taken already")
        number = len(self.deltas) + 1
        final = self.converge.decide().final
        path = os.path.join(self.work_dir, f"{number:02d}-{'dump' if final else 'pre-dump'}")
        dstats = DumpStats()
        started = time.monotonic()
        with progress.step(f"pass {number}"), self.converge.copying() as timing:
            self._take(path, final, dstats, number)
        self.converge.taken(number, final, dstats.pages_bytes, dstats.frozen_at, timing)
        self.last_seconds = time.monotonic() - started
        self.deltas.append(dstats.pages_bytes)
        self.previous = path
        if not final:
            self.last_pre_dump = path
        self.converge.handed_over()
        return path

    def applied(self, report, link_seconds=0.0):
        """follow() (or the destination host) applied the last set: its figures complete the pass's
        measures and its report."""
        self.converge.applied(report, link_seconds)

    def _take(self, path, final, stats, number):
        if final:
            self.final_taken = True
            early = self.early(path, number) if self.early is not None and not self.lazy_final else None
            with options.using(lazy_anon=self.lazy_final):
                self.frozen = dump_incremental(self.root, path, prev_images_dir=self.previous,
                                               tracker=self.tracker, stats=stats, keep_frozen=True,
                                               frozen_hook=self.converge.holding, durable=False,
                                               pages_done=early)
            self.frozen_at = stats.frozen_at
            self.converge.frozen()          # frozen now: the throttle goes at once
        else:
            dump_incremental(self.root, path, pre_dump=True, prev_images_dir=self.previous,
                             tracker=self.tracker, stats=stats, frozen_hook=self.converge.holding,
                             thawed_hook=self.converge.thawed, durable=False)

    def finish(self, ok, wait=True):
        """ok: kill the frozen source (wait=False: only SIGKILL it now, wait_killed() later, so that
        its parent's reaping is not in the downtime); else thaw it and take the tracking out."""
        self.converge.close()               # never leave the tree throttled, whatever happened
        frozen, self.frozen = self.frozen, None
        if frozen is not None:
            if ok:
                handover.forget()
                frozen.send_kill()
                self.killed = frozen
                if wait:
                    self.wait_killed()
                log.info("source killed: the replica runs in its place")
            else:
                handover.give_back(frozen)      # e.g. the controlling terminal, before it runs again
                frozen.thaw()
                log.info("source thawed: it goes on as before")
        if not ok and self.last_pre_dump is not None:
            untrack(self.root, self.last_pre_dump)

    def untrack_frozen(self):
        """The final dump's tree, still frozen, is to be left stopped (a post-copy phase that lost its
        destination): pycr's userfaultfds go first, as from a tree thawed."""
        if self.frozen is not None and self.last_pre_dump is not None:
            untrack_frozen(self.frozen, self.last_pre_dump)

    def wait_killed(self):
        """Wait until the killed source's PIDs are free (its parent reaped it)."""
        killed, self.killed = self.killed, None
        if killed is not None:
            try:
                killed.wait_gone(timeout=settings.freeze_timeout())
            except PycrError as exc:
                log.warning("warning: the source was killed but %s", exc)


def untrack(root, last_pass):
    """Take pycr's userfaultfds (and copies inherited by fork) out of a tree left running.

    last_pass is the last pre-dump: its tracker images name them (the final
    dump of a migration leaves them in place, at the same numbers).

    Closing the last reference makes the kernel drop every write-protect
    registration, so nothing of the pre-dumps stays in the source.
    """
    try:
        parent = ParentPass(ImageDir(last_pass))
    except PycrError:
        return
    if parent.inventory.tracker != "uffd-wp":
        return
    try:
        frozen = freeze(root, timeout=settings.freeze_timeout())
    except PycrError as exc:
        log.warning("the source could not be frozen to remove pycr's userfaultfds: %s", exc)
        return
    try:
        _close_uffds(frozen, parent)
    finally:
        frozen.thaw()


def untrack_frozen(frozen, last_pass):
    """untrack() for a tree pycr holds frozen still (the final dump's, about to be left stopped)."""
    try:
        parent = ParentPass(ImageDir(last_pass))
    except PycrError:
        return
    if parent.inventory.tracker == "uffd-wp":
        _close_uffds(frozen, parent)


def _close_uffds(frozen, parent):
    """Close, in each process of the frozen tree, the userfaultfds the pass `parent` names (and the
    copies of them its children inherited)."""
    try:
        owners = []
        for pid in frozen.processes:
            state = parent.state(pid) if parent.knows(pid, proc.stat(pid).start_time) else None
            if state is not None and state.uffd_fd >= 0:
                owners.append((pid, state.uffd_fd))
        for pid, threads in frozen.processes.items():
            mine = [fd for fd, link in proc.fds(pid).items()
                    if link == UFFD_LINK and _same_file_as_any(pid, fd, owners)]
            if mine:
                with Injector(threads[0]) as inj:
                    for fd in mine:
                        inj.call("close", fd)
                log.info("pid %d: closed pycr's userfaultfd(s) %s", pid, mine)
    except (PycrError, OSError) as exc:
        log.warning("removing pycr's userfaultfds from the source: %s", exc)


def _same_file_as_any(pid, fd, owners):
    for owner, owner_fd in owners:
        if (owner, owner_fd) == (pid, fd):
            return True
        try:
            if core.kcmp(pid, owner, abi.KCMP_FILE, fd, owner_fd) == 0:
                return True
        except OSError:
            continue
    return False


WORK_PREFIX = "pycr-migrate-"
_LOCK = ".pycr-lock"


def _hold(work_dir):
    """An exclusive flock on work_dir/.pycr-lock, held for the migration's life:
    the kernel drops it when pycr dies, however it dies."""
    fd = os.open(os.path.join(work_dir, _LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def sweep_work_dirs():
    """Remove the temporary work directories of migrations whose pycr was killed
    (no one holds their lock)."""
    top = tempfile.gettempdir()
    for name in os.listdir(top):
        path = os.path.join(top, name)
        if not name.startswith(WORK_PREFIX) or not os.path.isdir(path):
            continue
        try:
            fd = os.open(os.path.join(path, _LOCK), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue                      # not ours, or not yet locked: leave it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue                      # a running migration
        finally:
            os.close(fd)
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed %s, left by a migration that was killed", path)


@dataclass
class MigrationResult:
    replica: object
    reports: list
    summary: Summary
    work_dir: str


def migrate(root, work_dir=None, policy=None, tracker="auto", on_image_set=None, on_pass=None):
    """Move the tree rooted at `root` into a replica on this machine -> MigrationResult.

    work_dir keeps the image sets (default: a temporary directory, removed
    at the end). Hooks as in follow(). Raises a PycrError with the source
    running unharmed and no replica left when the migration fails.
    """
    try:
        if proc.status(root).tgid != root:
            raise PycrError(f"pid {root} is a thread, not a process")
    except TaskGone:
        raise TaskGone(root, "no process to migrate") from None
    keep = work_dir is not None
    if not keep:
        sweep_work_dirs()
    # absolute: each pass names its parent relative to its own directory
    work_dir = os.path.abspath(work_dir) if keep else tempfile.mkdtemp(prefix=WORK_PREFIX)
    try:
        os.makedirs(work_dir, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise PycrError(f"{work_dir}: cannot use it as the work directory: {exc.strerror}") from None
    lock = None if keep else _hold(work_dir)
    source = SourcePasses(root, work_dir, tracker, policy)
    handover.forget()
    try:
        # On one host the replica takes the frozen source's own sockets (pycr.restore.inetsk) and ptys
        # (pycr.restore.tty): their ports, connections and terminal indexes stay as they are, and a
        # failed migration thaws them untouched (a stolen controlling terminal is given back first).
        # It attaches the source's own SysV segments too (pycr.restore.sysvshm): their keys and ids are taken.
        # The copy's share of each pass is read from pycr.stats' phases (converge.py).
        timing = contextlib.nullcontext() if stats.active() else stats.collecting("migrate")
        with options.using(socket_handover=True, sysv_handover=True), timing:
            result = follow(source, pidns=True, on_image_set=on_image_set, on_pass=on_pass)
    finally:
        if not keep:
            shutil.rmtree(work_dir, ignore_errors=True)
            os.close(lock)
    replica = result.replica
    root_task = replica.tasks[root]
    summary = Summary(passes=len(result.reports), downtime=result.resumed_at - source.frozen_at,
                      total_bytes=sum(r.bytes for r in result.reports), root_pid=root,
                      root_real=root_task.real, init_real=replica.init_real or 0,
                      downtime_limit=source.policy.downtime_limit, expected=source.converge.last_expected,
                      throttle_max=source.converge.max_percent, throttle_kind=source.converge.mechanism)
    finish("migrate")
    return MigrationResult(replica, result.reports, summary, work_dir if keep else None)
