"""The replica: a restored tree held stopped and fixed up pass after pass.

Created from the first image set of a chain: every task made with its PID and
given its address space and pages, nothing else. Each later pass is applied
to it (apply): tasks that vanished are killed and reaped, new ones forked from
their replica parent (which carries pycr's workspace, so the child inherits
the trampoline and scratch), address spaces reshaped and the changed pages
written. No replica task ever runs its program meanwhile: every one sits in a
ptrace stop. The final pass (a dump) also drops the pages the source no
longer has, sets the real protections, and finishes each process as a plain
restore does (fds, credentials, threads, registers). resume() detaches it all.
discard() kills and reaps every task made so far.

A pass is applied in three steps so that its pages can go in as they arrive
(pycr.migrate.stream): begin() does everything that comes before the pages
the set holds itself (tree, layouts, shared objects), those pages are then
written (fill() from the set's files, or write_pages() from a network
buffer), and complete() does the rest (pages up the chain for ranges mapped
anew, pages dropped, mm fields, the final pass's finish).
"""

import functools
import os
import signal
import struct
import time
from dataclasses import dataclass, field

from pycr import proc
from pycr.abi import MADV_DONTNEED, WALL, WNOHANG
from pycr.errors import ImageError, PycrError, RestoreError, TaskGone
from pycr.log import log
from pycr.migrate import layout, mmdiff, treediff
from pycr.migrate import pages as pages_mod
from pycr.migrate.pages import PageWriter
from pycr.restore import files, lazy as lazy_mod, mm as restore_mm, preflight, tasks
from pycr.trackers import runs as R
from pycr.restore.restorer import Restore
from pycr.stats import phase
from pycr.sysinfo import page_size

PAGE = page_size()
REAP_TIMEOUT = 5.0
FINAL_KINDS = ("dump", "lazy-dump")     # a lazy dump: the final set of a post-copy or hybrid migration


@dataclass
class PassChanges:
    """What one pass changed in the replica (for the report)."""
    number: int = 0
    kind: str = ""
    added: list = field(default_factory=list)
    removed: list = field(default_factory=list)
    recreated: list = field(default_factory=list)
    pages_written: int = 0          # bytes written into the replica
    pages_dropped: int = 0          # bytes the source no longer had, dropped from the replica


@dataclass
class Staged:
    """A pass applied up to the pages its set holds itself (Replica.begin): what completes it."""
    images: object
    nodes: list
    lazy: object
    changes: PassChanges
    first: bool = False             # the set that created the replica
    targets: dict = field(default_factory=dict)     # owner (str(pid)) -> tasks.Task its own pages go to
    in_task: list = field(default_factory=list)     # first set: (remote, pidfd, owner, skip) read in by the tasks
    after: list = field(default_factory=list)       # what runs once every page is in, in order


def _exe(real):
    try:
        return proc.exe(real)
    except PycrError:
        return ""


def _strip_deleted(path):
    return path[: -len(" (deleted)")] if path.endswith(" (deleted)") else path


class Replica:
    """A tree restored from a pre-dump chain, kept stopped until resume()."""

    def __init__(self, pidns=False, pids_advice=preflight.PIDS_TAKEN):
        self.pidns = pidns
        self.pids_advice = pids_advice  # what a refusal of a PID in use tells the user to do
        self.run = None             # the Restore that made it (tasks, init, created, pidfd)
        self.images = None          # the image set last applied
        self.nodes = []             # [treediff.Node] as last applied
        self.passes = 0
        self.pages = PageWriter()
        self.made = {}              # mmdiff.made_backings() of the shared objects, this pass
        self.resumed = False

    # -- what tests and reports look at
    @property
    def tasks(self):
        """pid (in the replica's namespace) -> tasks.Task (real = the PID pycr sees)."""
        return self.run.tasks if self.run else {}

    @property
    def init_real(self):
        """PID (as pycr sees it) of the PID namespace's init, or None without --pidns."""
        return self.run.init.real if self.run and self.run.init else None

    @property
    def reals(self):
        """Every task of the replica as pycr sees them, init first."""
        return list(self.run.created) if self.run else []

    # -- passes
    def apply(self, images, lazy=None):
        """Bring the replica to the state of image set `images` -> PassChanges.

        lazy (a restore.lazy.LazyLink, for a lazy final set: post-copy or hybrid migration): the
        pages this set holds in private anonymous memory are served on fault by the lazy-pages
        daemon instead of written."""
        staged = self.begin(images, lazy)
        self.fill(staged)
        return self.complete(staged)

    def begin(self, images, lazy=None):
        """The first part of apply: the tree and every address space of `images`, but not the
        pages the set holds itself (level 0 of its chain) -> Staged. Those then come from the
        set's files (fill) or, as they arrive over the network, through write_pages;
        complete() does the rest."""
        nodes = treediff.nodes_of(images.imgdir.read("pstree"))
        if self.run is None:
            return self._create(images, nodes, lazy)
        self._check_same_tree(images)
        return self._update(images, nodes, lazy)

    def fill(self, staged):
        """The set's own pages, from its pages files: the first set's read in by the tasks
        themselves (injected preadv, overlapped), a later set's written from pycr."""
        chain = staged.images.pages
        if staged.first:
            if staged.in_task:
                with phase("page fill"):
                    staged.changes.pages_written += sum(chain.fill_tasks(staged.in_task))
            return
        for owner, task in staged.targets.items():
            staged.changes.pages_written += self.pages.write_delta(task.real, chain, owner)

    def write_pages(self, staged, owner, runs, data):
        """Write `data` (bytes of owner's pages file, back to back over `runs`) into its task."""
        written = self.pages.write_runs(staged.targets[owner].real, runs, data)
        staged.changes.pages_written += written
        return written

    def complete(self, staged):
        """The rest of apply, once the set's own pages are in -> PassChanges."""
        images, changes = staged.images, staged.changes
        for step_done in staged.after:
            step_done()
        if staged.first:
            log.info("replica: %d processes created, held stopped", len(self.run.tasks))
        elif staged.lazy is not None:
            self._hand_over(images, staged.lazy)
        kind = str(images.inventory.kind)
        changes.number = self.passes = self.passes + 1
        changes.kind = kind
        old, self.images, self.nodes = self.images, images, staged.nodes
        if old is not None:
            old.pages.close()
        if kind in FINAL_KINDS:
            self._finish(images, changes)
        return changes

    def _check_same_tree(self, images):
        root = images.inventory.root_pid
        if root != self.images.inventory.root_pid or \
                images.inventory.root_start_time != self.images.inventory.root_start_time:
            raise ImageError(images.imgdir.path, f"is an image set of another tree (root {root}), "
                             f"not of the replica's root {self.images.inventory.root_pid}")

    def _create(self, images, nodes, lazy=None):
        preflight.check(images, self.pidns, self.pids_advice)
        self.run = run = Restore(images, self.pidns, lazy)
        run.pidfd = files.pycr_pidfd()
        run.make_shared()               # the restorer's: the final pass's fds open these too
        run.create(zombies=False)
        staged = Staged(images, nodes, lazy, PassChanges(added=[p.pid for p in images.processes]), first=True)
        for p in images.processes:
            task = run.tasks[p.pid]
            r = task.remote
            files.close_inherited(r, run.pidfd)
            # every stub has pycr's pidfd until the final pass: it reads its pages in itself
            task.workspace, skip = restore_mm.prepare(r, p.mm, images.pages, run.shmem_paths, lazy)
            staged.targets[str(p.pid)] = task
            staged.in_task.append((r, run.pidfd, str(p.pid), skip))
            staged.after.append(functools.partial(self._created, task, p, skip, lazy))
        return staged

    @staticmethod
    def _created(task, p, skip, lazy):
        restore_mm.complete(task.remote, p.mm, skip, final=False, lazy=lazy)
        task.remote.reset_scratch()

    def _update(self, images, nodes, lazy=None):
        diff = treediff.diff(self.nodes, nodes)
        changes = PassChanges(added=[p for p in diff.added if p not in diff.recreated],
                              removed=[p for p in diff.removed if p not in diff.recreated],
                              recreated=sorted(diff.recreated))
        staged = Staged(images, nodes, lazy, changes)
        for pid in diff.removed:
            self._remove(pid)
        self.run.refresh_shared(images)
        self.made = mmdiff.made_backings(self.run.shmem_paths)
        by_pid = {p.pid: p for p in images.processes}
        for pid in diff.kept:
            task, p = self.run.tasks[pid], by_pid[pid]
            fresh = layout.apply(task, p.mm, self.run.shmem_paths, self.made)
            staged.targets[str(pid)] = task
            staged.after.append(functools.partial(self._update_task, task, p, images, changes, fresh))
        for pid in diff.added:
            p = by_pid[pid]
            task = self._fork(p)
            staged.targets[str(pid)] = task
            staged.after.append(functools.partial(self._settle_new, task, p, images, changes, resolve=True))
        self.run.images = images
        return staged

    def _hand_over(self, images, lazy):
        """The final set of a hybrid migration: the pages it holds itself in private anonymous memory
        are stale in the replica (written on the source since the pass that brought them). Drop exactly
        those (MADV_DONTNEED, the task stopped), then register the task's uffd MISSING on its lazy
        ranges: a touch of a dropped page faults and is served the new contents; every other page is
        present and never asked for."""
        self.run.lazy = lazy
        for p in images.processes:
            task, owner = self.run.tasks[p.pid], str(p.pid)
            ranges = lazy_mod.lazy_ranges(p.mm, images.pages, owner)
            spans = R.from_pairs(sorted((s, e) for s, e, _ in ranges))
            stale = R.intersect(R.normalize(pages_mod.delta_runs(images.pages, owner)), spans)
            if not stale:
                continue
            for start, end in R.pairs(stale):
                task.remote.check("madvise", start, end - start, MADV_DONTNEED, what=f"{start:#x}, DONTNEED")
            log.info("pid %d: dropped %d stale pages, to be served on fault", p.pid, R.total(stale) // PAGE)
            lazy.hand_over(task.remote, ranges)
            task.remote.reset_scratch()

    # -- one task
    def _update_task(self, task, p, images, changes, fresh):
        """A kept task, its layout applied and the pass's own pages in: the pages up the chain for
        ranges mapped anew, drop those gone, set the mm fields."""
        chain, owner = images.pages, str(p.pid)
        changes.pages_written += self.pages.write_resolved(task.real, chain, owner, fresh)
        previous = pages_mod.coverage(self.images.pages, owner)
        changes.pages_dropped += self.pages.zero_absent(task.remote, task.real, chain, owner, p.mm, previous)
        self._set_mm(task, p)

    def _set_mm(self, task, p):
        exe = _strip_deleted(p.mm.exe)
        relink = bool(exe) and exe != _exe(task.real)
        restore_mm.set_mm_map(task.remote, p.mm, exe_link=relink)
        task.remote.reset_scratch()

    def _fork(self, p):
        """Fork p from its replica parent with its PID and give it its layout (no pages yet)."""
        parent = self.run.tasks.get(p.ppid)
        if parent is None:
            raise RestoreError(f"pid {p.pid}: its parent {p.ppid} is not in the replica")
        task = fork_child(parent, p.pid, self.run.created)
        self.run.tasks[p.pid] = task
        _join_session_and_group(task, p, self.run.tasks)
        layout.apply(task, p.mm, self.run.shmem_paths, self.made)
        return task

    def _settle_new(self, task, p, images, changes, resolve=False):
        """A forked task holding the set's own pages: (resolve) the rest of its chain, then drop
        what it inherited but the source process does not have, and set the mm fields."""
        chain, owner = images.pages, str(p.pid)
        if resolve:
            changes.pages_written += self.pages.write_resolved(task.real, chain, owner,
                                                               pages_mod.coverage(chain, owner))
        changes.pages_dropped += self.pages.zero_absent(task.remote, task.real, chain, owner, p.mm)
        self._set_mm(task, p)
        log.info("pid %d: forked in the replica from pid %d and rebuilt", p.pid, p.ppid)

    def _add(self, p, images, changes):
        """Fork p from its replica parent with its PID, then rebuild its memory whole."""
        task = self._fork(p)
        changes.pages_written += images.pages.fill_task(task.real, str(p.pid))
        self._settle_new(task, p, images, changes)

    def _remove(self, pid):
        """Kill a replica task and reap it in its replica parent (it must leave no zombie)."""
        task = self.run.tasks.pop(pid)
        try:
            parent_real = proc.stat(task.real).ppid
        except TaskGone:
            parent_real = 0
        try:
            os.kill(task.real, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _wait_dead(task)
        reaper = self._by_real(parent_real)
        if reaper is not None:
            _reap_in(reaper, task.pid)
        if task.real in self.run.created:
            self.run.created.remove(task.real)
        log.info("pid %d: killed and reaped in the replica", pid)

    def _by_real(self, real):
        """The Remote of the replica task (or init) with that real PID."""
        for task in self.run.tasks.values():
            if task.real == real:
                return task.remote
        if self.run.init is not None and self.run.init.real == real:
            return self.run.init.remote
        return None

    # -- final pass
    def _finish(self, images, changes):
        """Set protections, then everything a plain restore does after memory.

        Sessions with a controlling terminal come last: their leaders take it
        (on one host, from the frozen source: as late as can be), then the
        other members are forked again so that they inherit it."""
        run = self.run
        for p in images.processes:
            layout.finish(run.tasks[p.pid], p.mm)
        run.descs = files.Descriptions(images)
        late = self._terminal_sessions(images, run.descs.objects.sessions())
        # as the final dump found them; a parent to be forked again makes its zombies after that
        tasks.create_zombies(images, run.tasks, run.created, [z for z in images.zombies if z.ppid not in late])
        for p in images.processes:
            if p.pid not in late:
                run.finish_process(run.tasks[p.pid], p)
        run.descs.objects.late_sessions(run.tasks, run.pidfd,
                                        lambda members: self._recreate(images, members, changes))
        tasks.create_zombies(images, run.tasks, run.created, [z for z in images.zombies if z.ppid in late])
        for p in images.processes:
            if p.pid in late:
                run.finish_process(run.tasks[p.pid], p)
        run.seal_shared()

    @staticmethod
    def _terminal_sessions(images, leaders):
        """Leaders of sessions with a controlling terminal, their members and the members'
        descendants (forked again once the leader has it)."""
        out, below = set(), set()           # below: members and their descendants
        for p in images.processes:          # parents first
            if p.pid in leaders:
                if p.ppid in below:
                    raise RestoreError(f"pid {p.pid} leads a session with a controlling terminal below a member "
                                       f"of session {images.by_pid(p.ppid).sid}: not supported by an incremental "
                                       "restore; use dump and restore")
                out.add(p.pid)
            elif p.sid in leaders or p.ppid in below:
                if p.sid in leaders and p.ppid not in out:
                    raise RestoreError(f"pid {p.pid} is in session {p.sid}, which has a controlling terminal, but "
                                       f"its parent {p.ppid} is not: it cannot inherit the terminal")
                out.add(p.pid)
                below.add(p.pid)
        return out

    def _recreate(self, images, members, changes):
        """Kill members of a session (and their descendants) in the replica, then fork them again,
        parents first, from parents that now hold the session's controlling terminal."""
        redo_pids = set()
        for p in images.processes:
            if p.pid in members or p.ppid in redo_pids:
                redo_pids.add(p.pid)
        redo = [p for p in images.processes if p.pid in redo_pids]
        for p in reversed(redo):
            if p.pid in self.run.tasks:
                self._remove(p.pid)
        for p in redo:
            self._add(p, images, changes)
            layout.finish(self.run.tasks[p.pid], p.mm)
        changes.recreated = sorted(set(changes.recreated) | (redo_pids - set(changes.added)))
        log.info("replica: pids %s forked again to inherit their session's controlling terminal",
                 sorted(redo_pids))

    def resume(self):
        """Detach every thread: the replica runs from here on."""
        self.run.release()
        self.resumed = True
        self._close()
        log.info("replica resumed: %d processes", len(self.run.tasks))

    def discard(self):
        """Kill and reap every task of the replica made so far."""
        if self.run is not None:
            self.run.abort()
        self._close()

    def _close(self):
        if self.run is not None:
            self.run.close()
        self.pages.close()


def fork_child(parent, pid, created):
    """clone3(set_tid=pid) injected into a replica task, through its workspace -> tasks.Task.

    The child is a copy of the parent (pycr's workspace included) and is
    auto-attached (PTRACE_O_TRACEFORK); it never runs: its first stop comes
    before it returns to user space.
    """
    r = parent.remote
    tid_addr = r.put(struct.pack("<i", pid))
    args = r.put(tasks.clone_args(set_tid=tid_addr, set_tid_size=1))
    res = r.call("clone3", args, tasks.CLONE_ARGS.size)
    r.reset_scratch()
    remote = tasks.born_child(parent, pid, res, created,
                              f"pid {pid} is in use in the replica's PID namespace")
    remote.use_scratch(*r.scratch)
    task = tasks.Task(pid, remote.real, remote)
    task.workspace = parent.workspace
    return task


def _join_session_and_group(task, p, all_tasks):
    """A new task is born in its parent's session and group; follow the image."""
    r = task.remote
    if p.sid == p.pid:
        r.check("setsid", what="")
    elif p.pgid == p.pid:
        r.check("setpgid", 0, 0, what="0, 0")
    elif p.pgid in all_tasks:
        res = r.call("setpgid", 0, p.pgid)
        if res < 0:
            log.warning("pid %d: setpgid(0, %d): %s", p.pid, p.pgid, os.strerror(-res))


def _wait_dead(task, timeout=REAP_TIMEOUT):
    """As its tracer, wait until a killed replica task has exited."""
    thread = task.remote.thread
    deadline = time.monotonic() + timeout
    while True:
        try:
            stop = thread.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except TaskGone:
            return
        except TimeoutError:
            raise RestoreError(f"pid {task.pid}: killed in the replica but did not exit") from None
        if stop.gone:
            return


def _reap_in(reaper, pid, timeout=REAP_TIMEOUT):
    """wait4(pid) injected into the task's parent, then the SIGCHLD it got is taken back."""
    deadline = time.monotonic() + timeout
    while True:
        res = reaper.call("wait4", pid, 0, WALL | WNOHANG, 0)
        if res == pid:
            break
        if res < 0:
            log.warning("pid %d: wait4 in its parent pid %d: %s", pid, reaper.pid, os.strerror(-res))
            return
        if time.monotonic() > deadline:
            raise RestoreError(f"pid {pid}: killed in the replica but its parent cannot reap it")
        time.sleep(0.001)
    if reaper.scratch is not None:
        mask = reaper.put(struct.pack("<Q", 1 << (signal.SIGCHLD - 1)))
        zero = reaper.put(struct.pack("<qq", 0, 0))
        reaper.call("rt_sigtimedwait", mask, 0, zero, 8)
        reaper.reset_scratch()
