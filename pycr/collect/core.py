"""Per-process and per-thread kernel state: credentials, limits, signals, registers.

Signal handlers have no /proc file (only the SigCgt/SigIgn bitmaps), so they
are read by injecting rt_sigaction(sig, NULL, &old) into the frozen task.
"""

import ctypes
import os
import struct
from signal import SIGKILL, SIGSTOP

from .. import proc
from ..errors import Unsupported, from_oserror
from ..native import core as native
from ..ptrace.inject import Injector
from ..abi import ARCH_GET_XCOMP_PERM, NR, PR_GET_TID_ADDRESS, SECCOMP_MODE_FILTER
from ..ptrace import xstate as X
from .timers import collect_itimers

KSIGACTION = struct.Struct("<QQQQ")      # handler, flags, restorer, mask (kernel layout)
SECCOMP_MODES = {0: "disabled", 1: "strict", 2: "filter"}
STACK_T = struct.Struct("<QiiQ")         # stack_t: ss_sp, ss_flags, (padding), ss_size


def collect_sigactions(injector):
    """All 64 kernel sigactions of the process, via injected rt_sigaction (one batch)."""
    out = []
    with injector.scratch(64 * KSIGACTION.size) as buf:
        sigs = [sig for sig in range(1, 65) if sig not in (SIGKILL, SIGSTOP)]
        calls = [(NR["rt_sigaction"], sig, 0, buf + (sig - 1) * KSIGACTION.size, 8) for sig in sigs]
        for sig, res in zip(sigs, injector.call_batch(calls)):
            if res < 0:
                raise from_oserror(OSError(-res, os.strerror(-res)), injector.pid, f"injected rt_sigaction({sig})")
        raw = injector.read(buf, 64 * KSIGACTION.size)
    for sig in range(1, 65):
        if sig in (SIGKILL, SIGSTOP):
            out.append({"handler": 0, "flags": 0, "restorer": 0, "mask": 0})
            continue
        handler, flags, restorer, mask = KSIGACTION.unpack_from(raw, (sig - 1) * KSIGACTION.size)
        out.append({"handler": handler, "flags": flags, "restorer": restorer, "mask": mask})
    return out


def robust_list(tid):
    """get_robust_list(tid): the futex list glibc registers per thread, read from outside."""
    head, length = ctypes.c_uint64(), ctypes.c_uint64()
    native.syscall(NR["get_robust_list"], tid, ctypes.addressof(head), ctypes.addressof(length))
    return head.value, length.value


def thread_links(thread):
    """clear_child_tid and the alternate signal stack, which only the thread itself can
    tell: read by injecting prctl(PR_GET_TID_ADDRESS) and sigaltstack(NULL, &old)."""
    with Injector(thread) as injector, injector.scratch() as buf:
        injector.check(NR["prctl"], PR_GET_TID_ADDRESS, buf, 0, 0, 0)
        injector.check(NR["sigaltstack"], 0, buf + 8)
        raw = injector.read(buf, 8 + STACK_T.size)
    (clear_tid,) = struct.unpack_from("<Q", raw, 0)
    sp, flags, _, size = STACK_T.unpack_from(raw, 8)
    return clear_tid, {"sp": sp, "flags": flags & 0xFFFFFFFF, "size": size}


def collect_thread(thread, pid):
    """CPU state, blocked mask, private pending signals, rseq and the kernel links of one thread.

    The registers and mask are read before thread_links() injects anything.
    """
    rseq_ptr, rseq_size, rseq_sig = thread.rseq_config()
    state = {
        "tid": thread.tid,
        "comm": proc.comm(pid, thread.tid),
        "regs": thread.get_regs().to_dict(),
        "xstate": thread.get_xstate(),
        "sigmask": thread.get_sigmask(),
        "pending": thread.peek_siginfo(shared=False),
        "rseq": {"pointer": rseq_ptr, "size": rseq_size, "signature": rseq_sig},
    }
    state["robust_list"], state["robust_list_len"] = robust_list(thread.tid)
    state["clear_tid_address"], state["sigaltstack"] = thread_links(thread)
    return state


def xcomp_perm(injector):
    """The dynamic xstate components (AMX tile data) the process was granted,
    read by injecting arch_prctl(ARCH_GET_XCOMP_PERM, &mask); 0 where the kernel
    has no such call (before 5.16, or a CPU without dynamic state)."""
    with injector.scratch(8) as buf:
        if injector.call(NR["arch_prctl"], ARCH_GET_XCOMP_PERM, buf) < 0:
            return 0
        (mask,) = struct.unpack("<Q", injector.read(buf, 8))
    return mask & X.DYNAMIC_COMPONENTS


DELETED = " (deleted)"


def check_paths(pid, src):
    """A deleted cwd or root is refused before the dump can end the tree: a restore could not
    enter it again (it would refuse the images, and the tree would be lost)."""
    for what, path in (("cwd", proc.cwd(src)), ("root", proc.root(src))):
        if path.endswith(DELETED):
            raise Unsupported(f"pid {pid}: its {what} {path[:-len(DELETED)]} was deleted: a restore could not "
                              "enter it again")


def collect_core(pid, thread_states, leader, injector):
    """The core image body of process pid.

    thread_states come from collect_thread(), taken before the injector
    touched any register or the signal mask; leader is the seized leader Thread,
    or a live thread once the leader has exited: per-process files are read
    through it then, since /proc/PID of a zombie leader has no cwd, root or umask.
    """
    src = leader.tid
    status = proc.status(src)
    uid, gid = status.uid, status.gid
    return {
        "pid": pid,
        "comm": proc.comm(pid),
        "personality": proc.personality(src),
        "umask": status.umask,
        "cwd": proc.cwd(src),
        "root": proc.root(src),
        "no_new_privs": bool(status.no_new_privs),
        "creds": {
            "uid": uid[0], "euid": uid[1], "suid": uid[2], "fsuid": uid[3],
            "gid": gid[0], "egid": gid[1], "sgid": gid[2], "fsgid": gid[3],
            "groups": list(status.groups),
            "cap_inh": status.cap_inh, "cap_prm": status.cap_prm, "cap_eff": status.cap_eff,
            "cap_bnd": status.cap_bnd, "cap_amb": status.cap_amb,
        },
        "rlimits": [{"cur": cur, "max": mx} for cur, mx in proc.rlimits(src)],
        "sigactions": collect_sigactions(injector),
        "shared_pending": leader.peek_siginfo(shared=True),
        "seccomp_mode": SECCOMP_MODES.get(status.seccomp, "disabled"),
        "seccomp_filters": leader.seccomp_filters() if status.seccomp == SECCOMP_MODE_FILTER else [],
        "xcomp_perm": xcomp_perm(injector),
        "itimers": collect_itimers(injector),
        "threads": thread_states,
    }
