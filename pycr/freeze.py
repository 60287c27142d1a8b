"""Freezing a process tree: every thread of every process in a ptrace stop.

freeze(root) seizes and interrupts each thread found through the children
links and /proc/PID/task, then lists again until a pass finds nothing new (a
stopped task cannot create tasks, so the set is then stable). Forks and clones
racing with the walk are auto-attached through PTRACE_O_TRACEFORK/CLONE/VFORK.
Threads are left in whatever ptrace stop they reached:
- an interrupt stop (the usual case);
- a job-control stop, for a task already stopped by SIGSTOP (kept stopped at thaw);
- a signal-delivery stop, whose signal is held and passed on at thaw;
- a vfork event stop for a vfork parent (it would wait for its child otherwise).
"""

import os
import signal
import time

from pycr import pidwait, proc, tcp_repair
from pycr.log import log
from pycr.abi import PF_KTHREAD, WALL
from pycr.errors import AccessDenied, PycrError, StopTimeout, TaskGone
from pycr.ptrace import binding as B
from pycr.ptrace.thread import Thread
from pycr.steps import step

DEFAULT_OPTIONS = (B.O_SUSPEND_SECCOMP | B.O_TRACEFORK | B.O_TRACEVFORK | B.O_TRACECLONE)
_NEW_TASK_EVENTS = (B.EVENT_FORK, B.EVENT_VFORK, B.EVENT_CLONE)


class FrozenTree:
    """A frozen tree. processes: pid -> [Thread] (leader first).

    Use as a context manager: on leaving, the tree is thawed unless thaw() or
    kill() was already called (in particular on an exception).
    """

    def __init__(self, root_pid):
        self.root_pid = root_pid
        self.processes = {}
        self.threads = {}          # tid -> Thread, every frozen thread
        self.job_stopped = set()   # tids that were in a SIGSTOP-style stop
        self.zombies = set()       # tids found already dead (not seizable)
        self._done = False

    def __repr__(self):
        return f"FrozenTree(root={self.root_pid}, processes={sorted(self.processes)})"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self._done:
            self.thaw()
        return False

    @property
    def pids(self):
        """The frozen processes, parents before children."""
        order = [p for p in _safe_descendants(self.root_pid) if p in self.processes]
        return order + [p for p in self.processes if p not in order]

    # building
    def _add(self, thread):
        pid = proc.status(thread.tid).tgid
        self.threads[thread.tid] = thread
        threads = self.processes.setdefault(pid, [])
        if thread.tid == pid:
            threads.insert(0, thread)
        else:
            threads.append(thread)

    def _seize(self, thread, options):
        """Seize and interrupt; False if the thread is gone or dead already.

        PTRACE_O_SUSPEND_SECCOMP (for injecting past seccomp filters) needs
        CAP_SYS_ADMIN: it is asked for only for a thread that has a filter,
        so that a user can freeze their own filter-free processes."""
        tid = thread.tid
        try:
            seccomp = proc.status(tid).seccomp
        except TaskGone:
            return False
        if not seccomp:
            options &= ~B.O_SUSPEND_SECCOMP
        try:
            thread.seize(options)
        except TaskGone:
            return False
        except AccessDenied:
            try:
                st = proc.status(tid)
            except TaskGone:
                return False
            if st.tracer_pid == os.getpid():
                return True   # auto-attached by a fork/clone event: its own stop is coming
            if st.state in "ZX":
                self.zombies.add(tid)
                return False
            if st.tracer_pid:
                raise AccessDenied(f"pid {tid} is already traced by pid {st.tracer_pid}") from None
            if options & B.O_SUSPEND_SECCOMP:
                raise AccessDenied(f"pid {tid} ({st.name}) has seccomp filters: freezing it needs "
                                   "PTRACE_O_SUSPEND_SECCOMP, which needs CAP_SYS_ADMIN") from None
            if any(uid != os.getuid() for uid in st.uid[:3]):
                raise AccessDenied(f"pid {tid} ({st.name}) belongs to uid {st.uid[0]}: tracing another "
                                   "user's process needs CAP_SYS_PTRACE") from None
            raise
        try:
            thread.interrupt()
        except TaskGone:
            pass      # it is exiting; wait() reports it
        return True

    def _settle(self, thread, pending, deadline, timeout):
        """Wait until thread sits in a ptrace stop we can leave it in."""
        while True:
            remaining = deadline - time.monotonic()
            try:
                stop = thread.wait(max(remaining, 0.0))
            except StopTimeout:
                raise PycrError(f"tid {thread.tid} did not stop within {timeout} s") from None
            except TaskGone:
                return
            if stop.gone:
                return
            if stop.is_interrupt_stop:
                break
            if stop.is_group_stop:
                self.job_stopped.add(thread.tid)
                break
            if stop.event in _NEW_TASK_EVENTS:
                child = thread.event_msg()
                if child not in self.threads and child not in pending:
                    pending[child] = Thread(child)
                if stop.event == B.EVENT_VFORK:
                    break   # a resumed vfork parent waits for the child and cannot be interrupted
            elif not stop.event:
                thread.hold_signal(stop)   # signal-delivery stop: stay here, pass it on at thaw
                break
            thread.cont()
            thread.interrupt()
        self._add(thread)

    def _freeze(self, options, timeout):
        deadline = time.monotonic() + timeout
        pending = {}
        self._pending = pending
        while True:
            found = False
            for pid in proc.descendants(self.root_pid):
                try:
                    tids = proc.tasks(pid)
                except TaskGone:
                    continue
                for tid in tids:
                    if tid in self.threads or tid in pending or tid in self.zombies:
                        continue
                    thread = Thread(tid)
                    step(f"seize {tid}")
                    if self._seize(thread, options):
                        pending[tid] = thread
                        found = True
            while pending:
                tid = next(iter(pending))
                self._settle(pending[tid], pending, deadline, timeout)
                pending.pop(tid, None)
            if not found:
                break
        if self.root_pid not in self.processes:
            raise TaskGone(self.root_pid, "exited while being frozen")
        self._leave_trampolines(deadline, timeout)

    def _leave_trampolines(self, deadline, timeout):
        """Leave no frozen thread inside pycr's syscall trampoline.

        A pycr killed during an injection leaves the task to finish the injected call and
        rt_sigreturn to its own registers by itself: a few instructions, which a freeze that
        comes at once may interrupt. There the registers are the injection's and the code is
        pycr's, which a dump would save and a cleanup would wipe under the thread. Such a
        thread is run on, from syscall stop to syscall stop (its signals are all blocked
        there), until it is back in its own code, then stopped as the others are."""
        from pycr.leftovers import trampoline_span
        for pid, threads in self.processes.items():
            vdso = _vdso_base(pid)
            if vdso is None:
                continue
            span = None
            for thread in threads:
                try:
                    if not vdso <= thread.get_regs().rip < vdso + _VDSO_MOST:
                        continue
                    span = span or trampoline_span(pid) or (0, 0)
                    if span[0] <= thread.get_regs().rip < span[0] + span[1]:
                        self._run_out(thread, span, deadline, timeout)
                except TaskGone:
                    continue

    def _run_out(self, thread, span, deadline, timeout):
        tid = thread.tid
        while span[0] <= thread.get_regs().rip < span[0] + span[1]:
            if tid in self.job_stopped:
                raise PycrError(f"tid {tid} is stopped (SIGSTOP) inside the syscall trampoline a killed pycr "
                                "left: send it SIGCONT, then run pycr again")
            step(f"run {tid} out of a killed pycr's trampoline")
            thread.syscall()
            try:
                stop = thread.wait(max(deadline - time.monotonic(), 0.0))
            except StopTimeout:
                raise PycrError(f"tid {tid} did not leave the syscall trampoline a killed pycr left "
                                f"within {timeout} s") from None
            if stop.gone:
                raise TaskGone(tid, "exited while it left a killed pycr's trampoline")
            if stop.is_group_stop:
                self.job_stopped.add(tid)
            elif stop.is_signal_delivery:
                thread.hold_signal(stop)
        log.info("tid %d: ran on out of the syscall trampoline a killed pycr left in its [vdso]", tid)
        stop = thread.to_interrupt_stop()
        if stop.gone:
            raise TaskGone(tid, "exited while it left a killed pycr's trampoline")
        if stop.is_group_stop:
            self.job_stopped.add(tid)

    def _rollback(self):
        """Let go of whatever was seized, so the tree runs on as before.

        Threads seized but not yet stopped are settled first (detach needs a
        stop), including children they forked meanwhile, which were auto-attached."""
        pending = getattr(self, "_pending", {})
        deadline = time.monotonic() + 2.0
        while pending:
            tid = next(iter(pending))
            thread = pending.pop(tid)
            try:
                self._settle(thread, pending, deadline, 2.0)
            except PycrError:
                pass
        self.thaw()

    # releasing
    def thaw(self):
        """Detach every thread; held signals are passed on, job-stopped tasks stay stopped.
        TCP connections a dump put in repair mode leave it first."""
        self._done = True
        tcp_repair.leave_all()
        errors = []
        for thread in list(self.threads.values()):
            try:
                thread.release()
            except TaskGone:
                pass
            except PycrError as exc:
                errors.append(str(exc))
        self.threads.clear()
        if errors:
            raise PycrError("thaw: " + "; ".join(errors))

    def kill(self, timeout=10.0):
        """SIGKILL every process and wait (at most timeout s) until their PIDs leave /proc.
        TCP connections a dump read go into repair mode first; pycr's copies are closed after: they go
        without FIN or RST."""
        self.send_kill()
        self.wait_gone(timeout)

    def send_kill(self):
        """SIGKILL every process (TCP connections into repair mode first): from here no task of
        the tree runs another instruction of its own, though its PIDs may stay taken a while."""
        try:
            tcp_repair.repair_all()
        finally:
            self._done = True
            for pid in self.processes:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def wait_gone(self, timeout=10.0):
        """After send_kill: wait (at most timeout s) until the PIDs leave /proc; pycr's copies of
        the TCP connections are closed after: they go without FIN or RST."""
        try:
            self._wait_gone(timeout)
        finally:
            tcp_repair.close_all()

    def _wait_gone(self, timeout):
        """As tracer we collect each thread's death so the real parent can reap it;
        processes whose parent is this process are reaped here. A process whose
        parent outside the tree does not reap it stays a zombie: PycrError names it.
        """
        try:
            if pidwait.reap_wakes():
                self._wait_gone_pidfds(timeout)
            else:
                self._wait_gone_polling(timeout)
        finally:
            self.threads.clear()

    def _wait_gone_pidfds(self, timeout):
        """pidwait.wait_reaped over a pidfd per task. Only traced tasks are opened before
        their exit is collected here, so none of their pidfds can name a reused PID;
        zombies found at freeze time are opened by number, as the /proc loop checks them."""
        fds = {}
        try:
            for tid in list(self.threads) + sorted(self.zombies - set(self.threads)):
                fd = pidwait.open_task(tid)
                if fd is not None:
                    fds[fd] = tid
            left = pidwait.wait_reaped(fds, timeout)
        finally:
            for fd in fds:
                os.close(fd)
        if left:
            pids = sorted({self._tgid_of(tid) for tid in left})
            raise PycrError(f"killed tree still present after {timeout} s: pids "
                            f"{pids} not reaped by their parents")

    def _tgid_of(self, tid):
        for pid, threads in self.processes.items():
            if any(t.tid == tid for t in threads):
                return pid
        return tid

    def _wait_gone_polling(self, timeout):
        """_wait_gone where the kernel does not wake pidfd pollers at a reap:
        waitpid(WNOHANG) and /proc every 2 ms."""
        pids = list(self.processes)
        deadline = time.monotonic() + timeout
        waiting = set(self.threads)
        me = os.getpid()
        while True:
            for tid in list(waiting):
                try:
                    got, status = os.waitpid(tid, WALL | os.WNOHANG)
                except ChildProcessError:
                    waiting.discard(tid)
                    continue
                if got and (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
                    waiting.discard(tid)
            left = []
            # Unreaped zombie children go with their killed parents (to init, which reaps them).
            for pid in pids + sorted(self.zombies - set(pids)):
                try:
                    st = proc.stat(pid)
                except TaskGone:
                    continue
                if st.ppid == me:
                    try:
                        os.waitpid(pid, os.WNOHANG)
                    except ChildProcessError:
                        pass
                left.append(pid)
            if not left and not waiting:
                break
            if time.monotonic() >= deadline:
                raise PycrError(f"killed tree still present after {timeout} s: pids "
                                f"{sorted(left)} not reaped by their parents")
            time.sleep(0.002)


_AT_SYSINFO_EHDR = 33
_VDSO_MOST = 64 << 10       # more than any [vdso] text: only a rip this close is looked at again


def _vdso_base(pid):
    """Where pid's [vdso] starts (AT_SYSINFO_EHDR of its auxv), or None."""
    try:
        return dict(proc.auxv(pid)).get(_AT_SYSINFO_EHDR)
    except (TaskGone, PycrError):
        return None


def _safe_descendants(pid):
    try:
        return proc.descendants(pid)
    except TaskGone:
        return []


def _refuse_untouchable(root_pid):
    """Roots no dump can take, named by the reason a user can act on."""
    if root_pid == 1:
        raise PycrError("pid 1 is init: pycr does not dump it")
    if proc.stat(root_pid).flags & PF_KTHREAD:
        raise PycrError(f"pid {root_pid} is a kernel thread: it has no user memory or registers to dump")


def freeze(root_pid, options=DEFAULT_OPTIONS, timeout=10.0):
    """Stop every thread of the tree rooted at root_pid; -> FrozenTree.

    Raises TaskGone for a missing pid, AccessDenied if a thread is traced by
    someone else, PycrError if a thread does not stop within timeout seconds.
    On any failure what was seized is released and the tree keeps running.
    """
    _refuse_untouchable(root_pid)
    st = proc.status(root_pid)
    if st.tgid != root_pid:
        raise PycrError(f"pid {root_pid} is a thread of pid {st.tgid}, not a process")
    if st.state in "ZX" and len(proc.tasks(root_pid)) < 2:   # a zombie leader with live threads is fine
        raise TaskGone(root_pid, "zombie")
    if os.getpid() in _safe_descendants(root_pid):
        raise PycrError(f"pid {root_pid} is this pycr's own ancestor (pycr is pid {os.getpid()}): "
                        "dump a tree pycr is not part of")
    tree = FrozenTree(root_pid)
    try:
        tree._freeze(options, timeout)
    except BaseException:
        tree._rollback()
        raise
    return tree


Frozen = FrozenTree
