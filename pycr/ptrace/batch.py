"""Many injected syscalls in one ptrace stop: a loop in pycr's trampoline area.

Each injected call costs a ptrace round trip (registers set, two syscall stops,
one wait each). A batch instead writes a table of calls into the task's scratch
space and lets a small loop run them all:

    loop: test %r12,%r12; jz done            r12 = entries left
          rax, rdi, rsi, rdx, r10, r8, r9 <- entry (rbx)
          syscall
          mov %rax, 56(%rbx)                 each result kept in its entry
          add $64,%rbx; dec %r12; jmp loop
    done: (see below)

An entry is 8 words: nr, six arguments, result. The loop uses no stack and no
memory but its table, so that the recovery frame above rsp stays intact.

In [vdso] padding (a live task) `done` jumps to the trampoline's
`mov $15,%eax; syscall`: whatever instant pycr dies at, the task runs the rest
of the table and rt_sigreturns into its own state. pycr gets its single stop
from two last entries it appends: rt_sigprocmask unblocks one signal that the
process ignores (by default or SIG_IGN) and has no handler for, then
tgkill sends it to the thread. Traced, the thread stops for it (a tracer sees
even ignored signals) and pycr discards it; untraced, the kernel drops it at
once. So only calls whose completion without pycr is harmless (reads) belong
in a batch of a live task. In the restorer's workspace `done` is an int3
(stubs die with pycr).
"""

import signal
import struct

from pycr.ptrace.sigframe import SIGRETURN_AT, TRAMPOLINE

ENTRY = struct.Struct("<8Q")
RESULT_OFFSET = 56
LOOP = bytes.fromhex(
    "4d85e4"          # test %r12,%r12
    "742a"            # jz done
    "488b03"          # mov (%rbx),%rax
    "488b7b08"        # mov 8(%rbx),%rdi
    "488b7310"        # mov 16(%rbx),%rsi
    "488b5318"        # mov 24(%rbx),%rdx
    "4c8b5320"        # mov 32(%rbx),%r10
    "4c8b4328"        # mov 40(%rbx),%r8
    "4c8b4b30"        # mov 48(%rbx),%r9
    "0f05"            # syscall
    "48894338"        # mov %rax,56(%rbx)
    "4883c340"        # add $64,%rbx
    "49ffcc"          # dec %r12
    "ebd1")           # jmp loop
AFTER_SYSCALL = 0x22  # offset in LOOP just after its `syscall`: where the end signal stops the task

# [vdso] padding: the trampoline, then the loop at BATCH_AT, ending in a jump to rt_sigreturn.
BATCH_AT = 16
VDSO_CODE = (TRAMPOLINE + bytes(BATCH_AT - len(TRAMPOLINE)) + LOOP
             + bytes([0xEB, (SIGRETURN_AT - (BATCH_AT + len(LOOP) + 2)) & 0xFF]))
# The restorer's workspace page: the loop ending in int3, this far from its `0f 05 cc`.
WORKSPACE_AT = 64
WORKSPACE_CODE = LOOP + b"\xcc"

# Signals whose default action is to ignore them, tried first; then any the process
# ignores (SIG_IGN). Never SIGCONT (sending it wakes a stopped group) nor a stop signal
# (sending one flushes a pending SIGCONT), whatever their disposition.
END_SIGNALS = (signal.SIGURG, signal.SIGWINCH, signal.SIGCHLD)
_NEVER = {signal.SIGKILL, signal.SIGSTOP, signal.SIGCONT, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU}


def table(calls):
    """The entries of calls [(nr, *args)], results zeroed."""
    out = bytearray()
    for nr, *args in calls:
        if len(args) > 6:
            raise ValueError("a syscall takes at most 6 arguments")
        words = [nr] + [a & 0xFFFFFFFFFFFFFFFF for a in args] + [0] * (7 - len(args))
        out += ENTRY.pack(*words)
    return bytes(out)


def results(raw, count):
    """The signed results of the first count entries of a table read back."""
    out = []
    for i in range(count):
        (value,) = struct.unpack_from("<q", raw, i * ENTRY.size + RESULT_OFFSET)
        out.append(value)
    return out


def end_signal(status, blocked, held=()):
    """A signal that can end a batch of a live task without a trace, or None: one the
    process ignores (by default or SIG_IGN), with no handler (status.sig_cgt), not pending
    for it nor held by pycr, so that discarding the one pycr sends loses nothing; not
    blocked by the thread's own mask, so that one left pending by pycr's death is dropped
    once rt_sigreturn restores that mask."""
    busy = status.sig_cgt | status.sig_pnd | status.shd_pnd | blocked
    ignored = [sig for sig in range(1, 65) if status.sig_ign >> (sig - 1) & 1 and sig not in _NEVER]
    for sig in (*END_SIGNALS, *ignored):
        if not busy >> (sig - 1) & 1 and sig not in held:
            return int(sig)
    return None
