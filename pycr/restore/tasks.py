"""Creating the tree of stub processes with the dumped PIDs, sessions and groups.

The root stub is started by pycr itself (clone3 with set_tid, then exec of the
stub). Every other process is forked *inside its parent stub* by an injected
clone3 with set_tid, so that parent links come out as dumped; the new task is
auto-attached because the parent was seized with PTRACE_O_TRACEFORK. A task
can join a session only by being forked into it, so setsid runs in a session
leader before it forks; process groups are set once every task exists.
Zombies are stubs forked the same way that exit before the tree runs.
"""

import errno
import os
import struct
import time
from signal import SIGCHLD

from pycr.abi import CLONE_FILES, NR, PR_SET_DUMPABLE, PR_SET_NAME, PR_SET_PDEATHSIG
from pycr import proc
from pycr.errors import AccessDenied, PycrError, RestoreError, TaskGone
from pycr.log import log
from pycr.steps import step
from pycr.native import core
from pycr.ptrace import binding as B
from pycr.ptrace.thread import Thread
from pycr.restore.remote import Remote, find_code

SYS_EXIT_GROUP = NR["exit_group"]
U64 = (1 << 64) - 1
SEIZE_OPTIONS = (B.O_TRACEFORK | B.O_TRACEVFORK | B.O_TRACECLONE | B.O_SUSPEND_SECCOMP | B.O_EXITKILL)
# What the kernel asks of a restorer that chooses PIDs (clone3 set_tid: EPERM without it).
PIDS_NEED = "restoring PIDs needs CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN in the PID namespace's user namespace"
CLONE_ARGS = struct.Struct("<QQQQQQQQQQQ")     # struct clone_args, VER2 (88 bytes)
SYS_PAUSE, SYS_WAIT4, SYS_NANOSLEEP = NR["pause"], NR["wait4"], NR["nanosleep"]


def has_seccomp(images):
    """True if a process of images has seccomp filters: they will apply to pycr's
    later injections unless the tasks are seized with PTRACE_O_SUSPEND_SECCOMP."""
    return any(str(p.core.seccomp_mode) != "disabled" for p in images.processes)


def clone_args(flags=0, exit_signal=SIGCHLD, set_tid=0, set_tid_size=0):
    """struct clone_args bytes: flags, pidfd, child_tid, parent_tid, exit_signal,
    stack, stack_size, tls, set_tid, set_tid_size, cgroup."""
    return CLONE_ARGS.pack(flags, 0, 0, 0, exit_signal, 0, 0, 0, set_tid, set_tid_size, 0)


class Task:
    """One restored process while pycr builds it: its leader Remote and thread objects."""

    def __init__(self, pid, real, remote):
        self.pid = pid
        self.real = real
        self.remote = remote
        self.threads = {pid: remote.thread}     # tid (as dumped) -> Thread

    def __repr__(self):
        return f"Task({self.pid}, real={self.real})"


def _stub_trampoline(real):
    """The `syscall; int3` of a fresh stub, found in its executable mapping."""
    for vma in proc.maps(real):
        if vma.exec and vma.kind == "file":
            addr = find_code(real, vma.start, vma.end)
            if addr is not None:
                return addr
    raise RestoreError(f"pid {real}: no syscall trampoline in the restore stub")


def _wait_in_stub(real, stub, syscalls, timeout=10.0):
    """Wait until task real has exec'd the stub and sleeps in one of `syscalls`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            exe, nr = proc.exe(real), proc.syscall(real)
        except TaskGone:
            raise TaskGone(real, "the restore stub exited at once") from None
        except PycrError:
            exe, nr = "", None
        if exe == stub and nr in syscalls:
            return
        if time.monotonic() > deadline:
            raise RestoreError(f"pid {real}: the restore stub did not start within {timeout:.0f} s")
        time.sleep(0.0005)


def seize_stub(real, pid, syscalls=(SYS_PAUSE,), need_suspend=True):
    """Seize a stub that pycr started, stop it, and wrap it in a Remote.
    Tasks it forks later are auto-attached with the same options.

    PTRACE_O_SUSPEND_SECCOMP needs CAP_SYS_ADMIN: without it the stub is seized
    without the option, which is enough unless seccomp filters are to be
    restored (need_suspend)."""
    stub = core.stub_path()
    _wait_in_stub(real, stub, syscalls)
    thread = Thread(real)
    try:
        thread.seize(SEIZE_OPTIONS)
    except AccessDenied:
        if need_suspend:
            raise RestoreError("restoring seccomp filters needs CAP_SYS_ADMIN (pycr suspends them "
                               "with PTRACE_O_SUSPEND_SECCOMP while it injects)") from None
        thread.seize(SEIZE_OPTIONS & ~B.O_SUSPEND_SECCOMP)
    thread.interrupt()
    while True:
        stop = thread.wait(timeout=10)
        if stop.gone:
            raise TaskGone(real, "the restore stub died")
        if stop.event == B.EVENT_STOP:
            break
        thread.cont(0)
    remote = Remote(thread, pid, real, _stub_trampoline(real))
    # The stub was started with PR_SET_PDEATHSIG so that it died with pycr until
    # now; from here PTRACE_O_EXITKILL does that, and the restored task must
    # outlive pycr once released.
    remote.check("prctl", PR_SET_PDEATHSIG, 0, what="PR_SET_PDEATHSIG, 0")
    return remote


def start_root(pid, created, need_suspend=True):
    """Start the root stub as PID pid in pycr's PID namespace; records it in created."""
    stub = core.stub_path()
    try:
        real = core.clone3_exec([pid], 0, stub, ["pycr-stub"])
        log.debug("pycr itself: clone3({flags=0, exit_signal=SIGCHLD, set_tid=[%d], set_tid_size=1}, 88) = %d, "
                  "then execve(%r) in the child", pid, real, stub)
    except OSError as exc:
        log.debug("pycr itself: clone3({flags=0, exit_signal=SIGCHLD, set_tid=[%d], set_tid_size=1}, 88) = -1 %s (%s)",
                  pid, errno.errorcode.get(exc.errno, exc.errno), exc.strerror)
        if exc.errno == errno.EEXIST:
            raise RestoreError(f"pid {pid} is in use; restore with --pidns") from None
        if exc.errno == errno.EPERM:
            raise RestoreError(f"{PIDS_NEED} (pid {pid})") from None
        raise RestoreError(f"cannot start the root stub as pid {pid}: {exc.strerror}") from None
    created.append(real)
    step(f"seize the root stub {real}")
    remote = seize_stub(real, pid, need_suspend=need_suspend)
    log.info("root: started pycr-stub as pid %d (clone3 set_tid) and seized it", pid)
    return Task(pid, real, remote)


def born_child(parent, pid, res, created, in_use):
    """The Remote of the child an injected clone3(set_tid=pid) in parent returned `res` for.

    The child was auto-attached (PTRACE_O_TRACEFORK); it is recorded in
    `created` at once so that a failure from here on kills it too.
    in_use: the message for EEXIST (the PID is taken).
    """
    r = parent.remote
    if res < 0:
        if res == -errno.EEXIST:
            raise RestoreError(in_use)
        if res == -errno.EPERM:
            raise RestoreError(f"{PIDS_NEED} (pid {pid})")
        raise RestoreError(f"pid {parent.pid}: clone3(set_tid={pid}) failed: {os.strerror(-res)}")
    thread = r.take_born()
    created.append(thread.tid)
    if res != pid:
        raise RestoreError(f"pid {parent.pid}: clone3 gave pid {res}, not {pid}")
    return Remote(thread, pid, thread.tid, r.trampoline)


def fork_in(parent, pid, created, flags=0):
    """Fork a stub child with PID pid (inner namespace) inside parent's stub."""
    r = parent.remote
    with r.inj.scratch(4096) as buf:
        r.write(buf, struct.pack("<i", pid))
        r.write(buf + 64, clone_args(flags=flags, set_tid=buf, set_tid_size=1))
        res = r.call("clone3", buf + 64, CLONE_ARGS.size)
    remote = born_child(parent, pid, res, created, f"pid {pid} is in use; restore with --pidns")
    step(f"forked pid {pid}")
    log.info("pid %d: forked in pid %d by injected clone3 (set_tid%s)", pid, parent.pid,
             ", CLONE_FILES" if flags & CLONE_FILES else "")
    return Task(pid, remote.real, remote)


def create_tree(images, root_task, created, zombies=True, terminals=None, pidfd=-1):
    """Create every process of images under root_task (already the root stub),
    then (with zombies) its zombies. Returns {pid: Task}, parents created before
    their children.

    A process that shared its parent's fd table is forked with CLONE_FILES:
    the kernel has no other way to make two processes share one table.
    Zombies are forked before process groups are set, since one may lead a
    group whose members live on. terminals (restore.kinds.KindObjects, with
    the descriptions already open) gives a session leader its controlling
    terminal right after its setsid, through pycr's pidfd that every stub
    inherited, and sets foreground groups once every group exists.
    """
    tasks = {images.root.pid: root_task}
    _session(root_task, images.root, terminals, pidfd)
    for proc_img in images.processes[1:]:
        parent = tasks[proc_img.ppid]
        task = fork_in(parent, proc_img.pid, created, CLONE_FILES if proc_img.shares_files else 0)
        tasks[proc_img.pid] = task
        _session(task, proc_img, terminals, pidfd)
    dead = images.zombies if zombies else []
    zombie_tasks = _fork_zombies(dead, tasks, created)
    _groups({**tasks, **zombie_tasks}, images.processes + dead)
    if terminals is not None:
        terminals.after_groups(tasks, pidfd)
    _finish_zombies(dead, tasks, zombie_tasks)
    return tasks


def create_zombies(images, tasks, created, zombies=None):
    """The zombies of images (or those listed), in a tree whose processes exist already
    (incremental restore)."""
    zombies = images.zombies if zombies is None else zombies
    zombie_tasks = _fork_zombies(zombies, tasks, created)
    _groups(zombie_tasks, zombies, known={p.pid for p in images.processes} | {z.pid for z in images.zombies})
    _finish_zombies(zombies, tasks, zombie_tasks)


def _fork_zombies(zombies, tasks, created):
    out = {}
    for z in zombies:
        out[z.pid] = fork_in(tasks[z.ppid], z.pid, created)
        _session(out[z.pid], z)
    return out


def _finish_zombies(zombies, tasks, zombie_tasks):
    for z in zombies:
        exit_as_zombie(zombie_tasks[z.pid], z.exit_code, z.comm)
    for ppid in dict.fromkeys(z.ppid for z in zombies):
        _take_back_sigchld(tasks[ppid])


def exit_as_zombie(task, status, comm=""):
    """Make a stub exit with wait status `status` (exit code << 8, or a signal).

    Its parent is a stopped stub that never calls wait, so the task stays a
    zombie with its PID for the restored parent to reap. A death by signal is
    reproduced by the signal itself, with the default action and no core file
    (the status then lacks the core-dumped bit 0x80).
    """
    r, thread = task.remote, task.remote.thread
    sig = status & 0x7F
    with r.inj.scratch(4096) as buf:
        if comm:
            r.write(buf + 64, os.fsencode(comm)[:15] + b"\0")
            r.check("prctl", PR_SET_NAME, buf + 64, 0, 0, 0, what="PR_SET_NAME")
        if sig:                                     # zeros at buf: SIG_DFL, no flags, empty mask
            r.check("rt_sigaction", sig, buf, 0, 8, what=f"{sig}, SIG_DFL")
    if sig:
        r.check("prctl", PR_SET_DUMPABLE, 0, 0, 0, 0, what="PR_SET_DUMPABLE, 0")
        r.finish()
        thread.set_sigmask(0)
        os.kill(task.real, sig)
    else:
        r.finish()
        regs = thread.get_regs()
        regs.rax, regs.rdi, regs.orig_rax, regs.rip = SYS_EXIT_GROUP, status >> 8 & 0xFF, U64, r.trampoline
        thread.set_regs(regs)
    thread.cont(0)
    while True:
        try:
            stop = thread.wait(timeout=10)
        except TimeoutError:
            raise RestoreError(f"pid {task.pid}: the zombie's stub did not exit with status {status:#x}") from None
        if stop.gone:
            break
        thread.cont(stop.signal if stop.is_signal_delivery else 0)
    # The tracer's wait handed it to its real parent: a zombie there.
    log.info("pid %d: exited with status %#x, left unreaped as a zombie", task.pid, status)


def _take_back_sigchld(parent):
    """The parent stub got a SIGCHLD for its restored zombies (held pending: pycr blocks
    every signal while it injects); the dumped process had it long ago. Dequeue it."""
    r = parent.remote
    with r.inj.scratch(4096) as buf:
        r.write(buf, struct.pack("<Qqq", 1 << (SIGCHLD - 1), 0, 0))
        r.call("rt_sigtimedwait", buf, 0, buf + 8, 8)


def _session(task, proc_img, terminals=None, pidfd=-1):
    """A session leader calls setsid before it forks anyone (children inherit sessions),
    and takes its controlling terminal (children inherit it at fork only)."""
    if proc_img.sid == proc_img.pid:
        task.remote.check("setsid", what="")
        log.info("pid %d: setsid (leads session %d)", task.pid, task.pid)
        if terminals is not None:
            terminals.in_session(task.remote, task.pid, pidfd)


def _groups(tasks, entries, known=()):
    """setpgid: group leaders first, then their members (same session by construction).
    entries: processes and zombies to place; known: other pids of the tree, made earlier."""
    pids = {p.pid for p in entries} | set(known)
    ordered = sorted(entries, key=lambda p: (p.pgid != p.pid, p.pid))
    for p in ordered:
        task = tasks[p.pid]
        if p.pgid == p.pid:
            if p.sid != p.pid:          # setsid already made it a group leader
                task.remote.check("setpgid", 0, 0, what="0, 0")
                log.info("pid %d: setpgid(0, 0) (leads group %d)", p.pid, p.pid)
        elif p.pgid in pids:
            task.remote.check("setpgid", 0, p.pgid, what=f"0, {p.pgid}")
            log.info("pid %d: setpgid(0, %d)", p.pid, p.pgid)
        else:
            log.info("pid %d: process group %d is outside the tree; it keeps the inherited group",
                     p.pid, p.pgid)
        if p.sid not in pids:
            log.info("pid %d: session %d is outside the tree; it keeps pycr's session", p.pid, p.sid)
