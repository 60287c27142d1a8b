"""Threads of a restored process and the CPU state of every thread.

Threads are cloned inside the leader (clone3 with CLONE_THREAD and set_tid =
the dumped TID) once the address space is in place; each is auto-attached
(PTRACE_O_TRACECLONE). rseq areas are registered from inside their own
thread, pending signals re-queued by the task to itself (the kernel lets a
task queue any siginfo to itself, not to others). Registers go in last, with
the fix-up the kernel would have made to a syscall interrupted by the freeze.
"""

import os
import struct
from errno import EINTR

from pycr.abi import (CLONE_FILES, CLONE_FS, CLONE_SIGHAND, CLONE_SYSVSEM, CLONE_THREAD, CLONE_VM, ERESTART_RESTARTBLOCK,
                      ERESTARTNOHAND, ERESTARTNOINTR, ERESTARTSYS, NR, PR_SET_NAME)
from pycr.errors import RestoreError
from pycr.log import log
from pycr.ptrace import xstate as X
from pycr.ptrace.thread import user_regs_struct
from pycr.restore.remote import Remote
from pycr.restore.tasks import CLONE_ARGS, clone_args

THREAD_FLAGS = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM
SYS_EXIT = NR["exit"]
U64 = (1 << 64) - 1


def create_threads(task, proc_img):
    """Clone every non-leader thread with its dumped TID; fills task.remotes."""
    leader = task.remote
    task.remotes = {task.pid: leader}
    for tid in proc_img.clone_tids:
        tid_addr = leader.put(struct.pack("<i", tid))
        args = leader.put(clone_args(flags=THREAD_FLAGS, exit_signal=0, set_tid=tid_addr, set_tid_size=1))
        leader.check("clone3", args, CLONE_ARGS.size, what=f"CLONE_THREAD, set_tid={tid}")
        leader.reset_scratch()
        thread = leader.take_born()
        task.threads[tid] = thread
        remote = Remote(thread, tid, thread.tid, leader.trampoline)
        remote.use_scratch(*leader.scratch)
        task.remotes[tid] = remote
    if proc_img.clone_tids:
        log.info("pid %d: cloned %d threads with their TIDs", task.pid, len(proc_img.clone_tids))


def _signo(info):
    return struct.unpack_from("<i", bytes(info), 0)[0]


def _thread_links(remote, th):
    """clear_child_tid, robust list and alternate signal stack, when the image has them
    (older images do not: a joined thread would then never wake its joiner)."""
    name = getattr(th, "comm", "")
    if name:
        addr = remote.put(os.fsencode(name)[:15] + b"\0")
        remote.check("prctl", PR_SET_NAME, addr, 0, 0, 0, what="PR_SET_NAME")
        remote.reset_scratch()
    clear_tid = getattr(th, "clear_tid_address", 0)
    if clear_tid:
        remote.check("set_tid_address", clear_tid, what=f"{clear_tid:#x}")
    head = getattr(th, "robust_list", 0)
    if head:
        remote.check("set_robust_list", head, getattr(th, "robust_list_len", 24), what=f"{head:#x}")
    alt = getattr(th, "sigaltstack", None)
    if alt is not None and alt.size:
        addr = remote.put(struct.pack("<QiiQ", alt.sp, alt.flags, 0, alt.size))
        remote.check(131, addr, 0, what="sigaltstack")
        remote.reset_scratch()


def queue_signals(task, proc_img):
    """Per-thread links, rseq registration and pending signals, each injected in its own thread."""
    core = proc_img.core
    for th in core.threads:
        remote = task.remotes[th.tid]
        _thread_links(remote, th)
        if th.rseq.pointer:
            remote.check("rseq", th.rseq.pointer, th.rseq.size, 0, th.rseq.signature,
                         what=f"{th.rseq.pointer:#x}")
        for info in th.pending:
            addr = remote.put(bytes(info))
            remote.check("rt_tgsigqueueinfo", task.pid, th.tid, _signo(info), addr,
                         what=f"signal {_signo(info)}")
            remote.reset_scratch()
    leader = task.remote
    for info in core.shared_pending:
        addr = leader.put(bytes(info))
        leader.check("rt_sigqueueinfo", task.pid, _signo(info), addr, what=f"signal {_signo(info)}")
        leader.reset_scratch()


def final_regs(thread_img):
    """The dumped registers, with an interrupted syscall set up as the kernel would."""
    regs = user_regs_struct.from_dict(dict(thread_img.regs))
    orig = regs.orig_rax
    if orig != U64 and not orig >> 63:
        rax = regs.rax - (1 << 64) if regs.rax >> 63 else regs.rax
        if rax in (-ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND):
            regs.rax = orig
            regs.rip -= 2
        elif rax == -ERESTART_RESTARTBLOCK:
            regs.rax = -EINTR & U64
    regs.orig_rax = U64
    return regs


def load_cpu_state(task, proc_img, layout):
    """Registers, xstate and blocked mask of every thread (injection is over for them).

    The xstate is moved from the dumping CPU's XSAVE layout (`layout`, from the
    inventory) to this CPU's; preflight checked that every component fits."""
    here = X.local_layout()
    for th in proc_img.core.threads:
        remote = task.remotes[th.tid]
        if th.xstate and X.in_use(th.xstate) & X.DYNAMIC_COMPONENTS:
            _grow_fpstate(remote)
        remote.finish()
        thread = task.threads[th.tid]
        thread.set_regs(final_regs(th))
        if th.xstate:
            thread.set_xstate(X.convert(th.xstate, layout, here))
        thread.set_sigmask(th.sigmask)
    if proc_img.leader_exited:
        _leader_exits_at_detach(task, proc_img)


# ldtilecfg (%rax); tilezero %tmm0; tilerelease; int3
TOUCH_TILES = b"\xc4\xe2\x78\x49\x00" b"\xc4\xe2\x7b\x49\xc0" b"\xc4\xe2\x78\x49\xc0" b"\xcc"
TILE_CONFIG = bytes([1]) + bytes(15) + (64).to_bytes(2, "little") + bytes(30) + bytes([16]) + bytes(15)


def _grow_fpstate(remote):
    """Make the kernel give this thread room for AMX tile data.

    A thread's XSAVE buffer is the small default until the thread first uses
    a dynamic component: the CPU traps it (XFD) and the kernel then enlarges
    the buffer, if the process is permitted. Until then SETREGSET refuses tile
    state (EINVAL). Tile data is the component behind XFD, so the thread
    zeroes one tile (after configuring it) and releases the tiles again, before
    its own xstate is loaded over all of it.
    """
    thread = remote.thread
    saved = thread.get_regs()
    code = remote.trampoline + 16
    remote.write(code, TOUCH_TILES)
    config = remote.put(TILE_CONFIG)
    regs = saved.copy()
    regs.rip, regs.rax, regs.orig_rax = code, config, U64
    thread.set_regs(regs)
    try:
        thread.cont()
        stop = thread.wait(timeout=10)
        if not (stop.stopped and stop.signal == 5 and thread.get_regs().rip == code + len(TOUCH_TILES)):
            raise RestoreError(f"pid {remote.pid}: the thread could not take AMX tile state ({stop!r} at "
                               f"{thread.get_regs().rip:#x})")
    finally:
        thread.set_regs(saved)
        remote.reset_scratch()
    log.info("tid %d: touched a tile (XFD fault) so that the kernel makes room for AMX tile data",
             remote.real)


def _leader_exits_at_detach(task, proc_img):
    """Set the leader up to call exit (not exit_group) as soon as it is detached.

    The kernel keeps a thread-group leader that exits while other threads run
    as a zombie (State Z, its PID still the process's) until the last thread
    is gone, and only then tells its parent, with the status of the group's
    exit or else the leader's own. The leader had to live until now: the
    address space, fds and threads were built through it. It blocks every
    signal first, so that none meant for the process is taken by it on the way.
    """
    remote = task.remotes[task.pid]
    remote.finish()
    thread = task.threads[task.pid]
    regs = thread.get_regs()
    regs.rip = _vdso_syscall(remote, proc_img)
    regs.rax, regs.rdi, regs.orig_rax = SYS_EXIT, proc_img.leader_exit_code >> 8 & 0xFF, U64
    thread.set_regs(regs)
    thread.set_sigmask(U64)
    log.info("pid %d: the leader exits at detach; its %d threads go on", task.pid, len(proc_img.tids))


def _vdso_syscall(remote, proc_img):
    """Address of a `syscall` in the restored [vdso]: code that stays once pycr's workspace is gone."""
    for vma in proc_img.mm.vmas:
        if str(vma.kind) == "vdso":
            at = remote.read(vma.start, vma.end - vma.start).find(b"\x0f\x05")
            if at >= 0:
                return vma.start + at
    raise RestoreError(f"pid {proc_img.pid}: its leader had exited, and there is no [vdso] "
                       "with a syscall instruction to make it exit again")

