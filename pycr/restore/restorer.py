"""`pycr restore`: orchestration, cleanup on failure, detach.

1. load and check every image, then the system (PIDs free, files present);
2. create the tree of stubs with the dumped PIDs, sessions and groups;
3. per process: address space, memory, fds, identity, handlers, threads,
   limits, signals, seccomp, credentials, registers; drop pycr's workspace;
4. detach every thread: each goes on where it was frozen.
Anything failing before 4 kills and reaps every task made so far.
"""

import contextlib
import ctypes
import os
import signal
import time

from pycr import pidwait, proc, progress
from pycr.abi import PR_GET_CHILD_SUBREAPER, PR_SET_CHILD_SUBREAPER, WALL
from pycr.errors import PycrError
from pycr.log import log
from pycr.native.core import Copier, pidfd_send_signal
from pycr.ptrace.inject import Injector
from pycr.restore import file_locks, files, ghost, memfd, mm, pidns as pidns_mod, preflight, process, sysvshm, tasks, \
    threads, timers
from pycr.restore.load import load_images
from pycr.stats import count, done, phase
from pycr.steps import finish, step

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


class Restore:
    """One restore in progress: what was created, and how to undo it."""

    def __init__(self, images, pidns=False, lazy=None):
        self.images = images
        self.lazy = lazy            # restore.lazy.LazyLink with --lazy-pages
        self.pidns = pidns
        self.created = []           # real PIDs of every task made, for cleanup
        self.tasks = {}             # dumped pid -> tasks.Task
        self.init = None            # the PID 1 stub with --pidns
        self.descs = None
        self.pidfd = -1
        self.shared = self.segments = self.ghosts = None
        self.shmem_paths = {}
        self.released = False

    # -- steps
    def open_files(self):
        """Every shared object, every open file description, and pycr's pidfd the stubs will inherit."""
        with phase("files"):
            self._open_files()

    def _open_files(self):
        self.make_shared()
        self.descs = files.Descriptions(self.images)
        self.pidfd = files.pycr_pidfd()

    def make_shared(self):
        """Every object that fds and mappings share (memfds and shared memory, ghost files, SysV
        segments), made once, before any task exists; open_files and the mappings use these."""
        self.shared = memfd.shared(self.images)
        self.shared.make_all()
        self.segments = sysvshm.holder(self.images)
        self.segments.make_all()
        self.ghosts = ghost.holder(self.images)
        self._shared_paths()

    def refresh_shared(self, images):
        """An incremental restore moves on to `images`: the same shared objects, filled with
        its contents (what the replica maps sees them at once), new ones made."""
        images.made = self.images.made          # one set of objects for every pass
        self.images = images
        for holder in (self.shared, self.segments, self.ghosts):
            holder.refresh(images)
        self._shared_paths()

    def _shared_paths(self):
        self.shmem_paths = {**self.shared.paths, **self.segments.paths(), **self.ghosts.paths()}

    def seal_shared(self):
        """Every mapping is made: seals and IPC_RMID can refuse no later step now."""
        self.shared.seal()
        self.segments.finish()

    def create(self, zombies=True):
        """The tree of stubs; with zombies, its zombies too (an incremental restore
        makes them at its final pass: they may be reaped by then)."""
        with phase("task creation"):
            self._create(zombies)

    def _create(self, zombies):
        root = self.images.root
        need_suspend = tasks.has_seccomp(self.images)
        if self.pidns:
            self.init = pidns_mod.start_init(self.created, self.pidfd, need_suspend)
            root_task = tasks.fork_in(self.init, root.pid, self.created)
        else:
            root_task = tasks.start_root(root.pid, self.created, need_suspend)
        terminals = self.descs.objects if self.descs is not None else None
        self.tasks = tasks.create_tree(self.images, root_task, self.created, zombies=zombies,
                                       terminals=terminals, pidfd=self.pidfd)

    def rebuild(self):
        """Every process's address space laid out, then all filled at once (the tasks
        read their pages in themselves, overlapped), then each process finished."""
        pages = self.images.pages
        laid_out, in_task = [], []
        for p in self.images.processes:
            task = self.tasks[p.pid]
            r = task.remote
            step(f"rebuild pid {p.pid}")
            if not p.shares_files:      # its table is its parent's, already restored
                with phase("files"):
                    files.close_inherited(r, self.pidfd)
            task.workspace, skip = mm.prepare(r, p.mm, pages, self.shmem_paths, lazy=self.lazy)
            laid_out.append((task, p, skip))
            if p.shares_files:
                # pycr's pidfd is in its table (its parent's) only until the parent's files are
                # restored: pycr writes its pages itself
                with phase("page fill"):
                    count("pages filled", pages.fill_task(r.real, str(r.pid), skip=skip) // mm.PAGE)
            else:
                in_task.append((r, self.pidfd, str(p.pid), skip))
        step("fill memory")
        with phase("page fill"):
            count("pages filled", sum(pages.fill_tasks(in_task)) // mm.PAGE if in_task else 0)
        for task, p, skip in laid_out:
            mm.complete(task.remote, p.mm, skip, lazy=self.lazy)
            self.finish_process(task, p)
        self.seal_shared()

    def finish_process(self, task, p):
        """Everything after the address space: fds, identity, handlers, threads, limits,
        signals, seccomp, credentials, registers; then pycr's workspace goes.
        (Incremental restore calls this once a replica's memory is final.)"""
        with phase("process state"):
            self._finish_process(task, p)

    def _finish_process(self, task, p):
        r = task.remote
        core = p.core
        with phase("files"):
            if not p.shares_files:          # else its parent's fds are its own already
                files.restore_fds(r, p.pid, p.fds, self.descs, self.pidfd)
            if p.file_locks:                # after restore_fds: its close()s would drop POSIX locks
                file_locks.take(r, p.pid, p.file_locks, p.fds, self.descs, self.created)
        process.set_identity(r, core)
        process.set_dirs(r, core)
        process.set_sigactions(r, core)
        process.set_xcomp_perm(r, core)         # permission is per process: before the threads
        threads.create_threads(task, p)
        process.set_rlimits(r, core)
        threads.queue_signals(task, p)
        timers.create_posix_timers(r, p.posix_timers)   # after the threads: SIGEV_THREAD_ID names one
        timers.set_itimers(r, core)
        process.set_seccomp(r, core)
        for remote in task.remotes.values():    # credentials are per thread in the kernel
            process.set_creds(remote, core)
        with phase("registers"):
            threads.load_cpu_state(task, p, self.images.cpu_layout)
        self._drop_workspace(task)

    def _drop_workspace(self, task):
        """munmap the trampoline and scratch through a `syscall` of the restored vdso."""
        inj = Injector(task.threads[task.pid])
        try:
            res = inj.call("munmap", task.workspace, mm.WORKSPACE_SIZE)
        except PycrError as exc:
            log.warning("pid %d: pycr's workspace at %#x stays mapped: %s", task.pid, task.workspace, exc)
            return
        finally:
            inj.restore()
        if res < 0:
            log.warning("pid %d: munmap of pycr's workspace failed: %s", task.pid, os.strerror(-res))

    def release(self):
        """Detach every thread of every process: the tree runs from here on."""
        step("release the restored tree")
        with phase("detach"):
            self._release()

    def _release(self):
        if self.lazy is not None:
            self.lazy.go()
        if self.descs is not None:
            self.descs.objects.before_release(self.tasks)
        for task in self.tasks.values():
            p = self.images.by_pid(task.pid)
            if p is not None and p.core.job_stopped:
                # pending before the detach: the group stops before it runs an instruction
                os.kill(task.real, signal.SIGSTOP)
            for thread in task.threads.values():
                thread.detach(0)
        self.released = True
        if self.init is not None:
            # init is not held: it reaps the namespace's orphans, and pycr's death
            # cannot take the namespace down (no PTRACE_O_EXITKILL left on it).
            pidns_mod.release_init(self.init, self.images.root.pid)
        log.info("detached %d threads of %d processes", sum(len(t.threads) for t in self.tasks.values()),
                 len(self.tasks))

    def close(self):
        if self.lazy is not None:
            self.lazy.close()
        if self.descs is not None:
            self.descs.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        for made in self.images.made.values():     # memfds, ghost files; segments of a failed restore
            made.close()
        self.images.made.clear()
        self.images.pages.close()

    def abort(self):
        """SIGKILL every task created so far and wait until each PID is free again."""
        kill_and_reap(self.created)

    def wait_root(self):
        root = self.tasks[self.images.root.pid]
        if self.init is not None:
            return pidns_mod.wait_root(self.init, root)
        _, status = os.waitpid(root.real, 0)
        if os.WIFSIGNALED(status):
            return 128 + os.WTERMSIG(status)
        return os.WEXITSTATUS(status)


def kill_and_reap(reals, timeout=10.0):
    """Kill tasks (by real PID) and reap them, also those whose parents die with them.

    pycr becomes a child subreaper for the time of the cleanup, so orphaned
    stubs are reparented to pycr and reaped here instead of lingering until
    PID 1 gets to them.
    """
    if not reals:
        return
    was = ctypes.c_int()
    _libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.addressof(was), 0, 0, 0)
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        if pidwait.reap_wakes():
            pending = _kill_and_reap_pidfds(reals, timeout)
        else:
            pending = _kill_and_reap_polling(reals, timeout)
        if pending:
            log.warning("tasks %s were killed but are not reaped yet", pending)
    finally:
        _libc.prctl(PR_SET_CHILD_SUBREAPER, was.value, 0, 0, 0)


def _kill_and_reap_pidfds(reals, timeout):
    """Each task killed through a pidfd opened first (no PID-reuse race), then
    pidwait.wait_reaped: reaped here where pycr is its tracer or (sub)reaper.

    Every other thread of a task gets a pidfd of its own: pycr traces them, so each
    exited thread stays a zombie until pycr collects it, and until then its leader is
    never reported, to pycr or to its parent. (A namespace's init stub dying meanwhile
    waits in the kernel for every task of the namespace to be reaped.)"""
    fds = {}
    try:
        for real in reals:
            fd = pidwait.open_task(real)
            if fd is None:
                continue
            fds[fd] = real
            for tid in _other_threads(real):
                thread_fd = pidwait.open_task(tid)
                if thread_fd is not None:
                    fds[thread_fd] = tid
            with contextlib.suppress(ProcessLookupError):
                pidfd_send_signal(fd, signal.SIGKILL)
        return sorted(set(pidwait.wait_reaped(fds, timeout)) & set(reals))
    finally:
        for fd in fds:
            os.close(fd)


def _other_threads(real):
    """The thread IDs of task real's process other than real (none once it is gone)."""
    try:
        return [tid for tid in proc.tasks(real) if tid != real]
    except PycrError:
        return []


def _kill_and_reap_polling(reals, timeout):
    """kill_and_reap where the kernel does not wake pidfd pollers at a reap: /proc every 2 ms."""
    for real in reals:
        with contextlib.suppress(ProcessLookupError):
            os.kill(real, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    pending = list(reals)
    while pending and time.monotonic() < deadline:
        for real in list(pending):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(real, os.WNOHANG | WALL)
            if not proc.exists(real):
                pending.remove(real)
        if pending:
            time.sleep(0.002)
    return pending


def restore(images_dir, detach=False, pidns=False, trust_images=False, on_running=None, lazy_pages=None):
    """Restore the tree dumped in images_dir.

    With detach, return 0 once the tree runs; otherwise wait for the restored
    root task and return its exit status, or 128 + the signal that killed it.
    trust_images: accept images another user owns or may write (see restore.trust).
    on_running(run, seconds) is called once the tree runs, before the wait (the CLI's
    pidfile and summary).
    lazy_pages: the work directory of a `pycr lazy-pages` daemon, which then serves the
    anonymous private memory on fault (restore.lazy); None fills all memory now.
    """
    started = time.monotonic()
    with phase("image load and checks"):
        with Copier():                      # the buffer checksums are read through
            images = load_images(images_dir, trust_images=trust_images, allow_lazy=lazy_pages is not None)
        log.info("images of %d processes loaded and checked", len(images.processes))
        preflight.check(images, pidns)
    count("processes", len(images.processes))
    lazy = None
    if lazy_pages is not None:
        from pycr.restore.lazy import LazyLink
        lazy = LazyLink(images_dir, lazy_pages)
    run = Restore(images, pidns, lazy)
    try:
        run.open_files()
        run.create()
        with progress.step("restore"):
            progress.total(sum(images.pages.saved_bytes(str(p.pid)) for p in images.processes))
            run.rebuild()
        run.release()
    except BaseException:
        log.info("restore failed: killing the %d tasks created so far", len(run.created))
        run.abort()
        raise
    finally:
        with phase("files"):
            run.close()
    finish("restore")
    done()
    log.info("restore done in %.3f s", time.monotonic() - started)
    if on_running is not None:
        on_running(run, time.monotonic() - started)
    if detach:
        return 0
    return run.wait_root()
