"""Per-process and per-thread kernel state: credentials, limits, signals, registers.

Signal handlers have no /proc file (only the SigCgt/SigIgn bitmaps), so they
are read by injecting rt_sigaction(sig, NULL, &old) into the frozen task.
"""

import struct

from .. import proc
from ..ptrace.syscalls import NR

SIGKILL, SIGSTOP = 9, 19
KSIGACTION = struct.Struct("<QQQQ")      # handler, flags, restorer, mask (kernel layout)
SECCOMP_MODES = {0: "disabled", 1: "strict", 2: "filter"}


def collect_sigactions(injector):
    """All 64 kernel sigactions of the process, via injected rt_sigaction."""
    out = []
    with injector.scratch(64 * KSIGACTION.size) as buf:
        for sig in range(1, 65):
            if sig in (SIGKILL, SIGSTOP):
                continue
            injector.check(NR["rt_sigaction"], sig, 0, buf + (sig - 1) * KSIGACTION.size, 8)
        raw = injector.read(buf, 64 * KSIGACTION.size)
    for sig in range(1, 65):
        if sig in (SIGKILL, SIGSTOP):
            out.append({"handler": 0, "flags": 0, "restorer": 0, "mask": 0})
            continue
        handler, flags, restorer, mask = KSIGACTION.unpack_from(raw, (sig - 1) * KSIGACTION.size)
        out.append({"handler": handler, "flags": flags, "restorer": restorer, "mask": mask})
    return out


def collect_thread(thread):
    """Registers, extended state, blocked mask, private pending signals, rseq of one thread."""
    rseq_ptr, rseq_size, rseq_sig = thread.rseq_config()
    return {
        "tid": thread.tid,
        "regs": thread.get_regs().to_dict(),
        "xstate": thread.get_xstate(),
        "sigmask": thread.get_sigmask(),
        "pending": thread.peek_siginfo(shared=False),
        "rseq": {"pointer": rseq_ptr, "size": rseq_size, "signature": rseq_sig},
    }


def collect_core(pid, thread_states, leader, injector):
    """The core image body of process pid.

    thread_states come from collect_thread(), taken before the injector
    touched any register or the signal mask; leader is the seized leader Thread.
    """
    status = proc.status(pid)
    uid, gid = status.uid, status.gid
    return {
        "pid": pid,
        "comm": proc.comm(pid),
        "personality": proc.personality(pid),
        "umask": status.umask,
        "cwd": proc.cwd(pid),
        "root": proc.root(pid),
        "no_new_privs": bool(status.no_new_privs),
        "creds": {
            "uid": uid[0], "euid": uid[1], "suid": uid[2], "fsuid": uid[3],
            "gid": gid[0], "egid": gid[1], "sgid": gid[2], "fsgid": gid[3],
            "groups": list(status.groups),
            "cap_inh": status.cap_inh, "cap_prm": status.cap_prm, "cap_eff": status.cap_eff,
            "cap_bnd": status.cap_bnd, "cap_amb": status.cap_amb,
        },
        "rlimits": [{"cur": cur, "max": mx} for cur, mx in proc.rlimits(pid)],
        "sigactions": collect_sigactions(injector),
        "shared_pending": leader.peek_siginfo(shared=True),
        "seccomp_mode": SECCOMP_MODES.get(status.seccomp, "disabled"),
        "seccomp_filters": leader.seccomp_filters() if status.seccomp == 2 else [],
        "threads": thread_states,
    }
