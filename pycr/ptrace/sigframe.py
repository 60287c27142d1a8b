"""A recovery frame: the task's own state, laid out for rt_sigreturn.

While pycr runs syscalls inside a task, the task's registers point at pycr's
trampoline. If pycr dies there (SIGKILL, OOM), the kernel detaches and the
task runs on from those registers. The trampoline is
    syscall ; mov $15, %eax ; syscall
and every injected call runs with rsp just above a frame built here, so that
whatever syscall was in flight, the task then executes rt_sigreturn and the
kernel loads its original registers, blocked mask, alternate stack and
extended state from the frame, exactly as after a signal handler. The frame
sits below the task's red zone, the area the ABI leaves to signal delivery.

Layout (x86_64 struct rt_sigframe): pretcode (8) at rsp-8, then ucontext
{uc_flags, uc_link, uc_stack (24), uc_mcontext = sigcontext (256), uc_sigmask},
a siginfo (128), and the XSAVE image (64-byte aligned) ending in FP_XSTATE_MAGIC2.
"""

import struct

from pycr.abi import ERESTART_RESTARTBLOCK, ERESTARTNOHAND, ERESTARTNOINTR, ERESTARTSYS, NR
from pycr.ptrace import xstate as X

TRAMPOLINE = b"\x0f\x05" + b"\xb8\x0f\x00\x00\x00" + b"\x0f\x05"   # syscall; mov $15,%eax; syscall
SIGRETURN_AT = 2          # offset of `mov $15, %eax` in TRAMPOLINE: where an injected call returns
RED_ZONE = 128

UC_FP_XSTATE = 0x1
UC_SIGCONTEXT_SS = 0x2
UC_STRICT_RESTORE_SS = 0x4
FP_XSTATE_MAGIC1 = 0x46505853
FP_XSTATE_MAGIC2 = 0x46505845

UC_OFFSET = 8                        # after pretcode
UC_STACK_OFFSET = UC_OFFSET + 16     # stack_t uc_stack: what sigaltstack(NULL, &old) fills in
MCONTEXT_OFFSET = UC_OFFSET + 40
SIGMASK_OFFSET = MCONTEXT_OFFSET + 256
FPSTATE_OFFSET = 448                 # after the siginfo, rounded up to 64
_SIGCONTEXT = struct.Struct("<18Q4H4QQ")   # r8..eflags, cs gs fs ss, err trapno oldmask cr2, fpstate

NR_RESTART_SYSCALL = NR["restart_syscall"]


def _signed(value):
    return value - (1 << 64) if value & (1 << 63) else value


def resumed_regs(regs):
    """The registers the task would resume with if released now with no handler run.

    A task stopped inside an interrupted syscall carries rax = -ERESTART*; the
    kernel would restart it on the way out (rip back over `syscall`). rt_sigreturn
    sets orig_rax = -1 and skips that, so the frame holds the restarted form.
    restart_syscall after rt_sigreturn returns -EINTR, as after any handler.
    """
    regs = regs.copy()
    if _signed(regs.orig_rax) >= 0:
        err = -_signed(regs.rax)
        if err in (ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND):
            regs.rax = regs.orig_rax
            regs.rip -= 2
        elif err == ERESTART_RESTARTBLOCK:
            regs.rax = NR_RESTART_SYSCALL
            regs.rip -= 2
    return regs


def _fpstate(xstate, layout):
    """The XSAVE image for the frame: only as long as the components in use need,
    so that it fits the task's own signal-frame size (AMX state only if it uses AMX)."""
    xstate = bytearray(xstate)
    in_use = X.in_use(xstate) | 0x3
    size = X.MIN_SIZE if len(xstate) >= X.MIN_SIZE else X.LEGACY_SIZE
    for i, (off, n) in layout.components.items():
        if in_use >> i & 1:
            size = max(size, off + n)
    size = min(size, len(xstate))
    image = xstate[:size]
    struct.pack_into("<IIQI", image, 464, FP_XSTATE_MAGIC1, size + 4, in_use, size)
    image[464 + 20:512] = bytes(512 - 464 - 20)
    if size >= X.MIN_SIZE:
        struct.pack_into("<Q", image, X.XCOMP_BV_OFFSET, 0)
    return bytes(image) + struct.pack("<I", FP_XSTATE_MAGIC2)


def frame_size(xstate_len):
    return FPSTATE_OFFSET + xstate_len + 4


def build(regs, xstate, sigmask, frame_addr, layout=None):
    """The bytes of a recovery frame to be placed at frame_addr (64-byte aligned).

    uc_stack is left zero: the first injected call, sigaltstack(NULL, &uc_stack),
    has the kernel fill it in (the alternate stack cannot be read from outside).
    """
    layout = layout or X.local_layout()
    r = resumed_regs(regs)
    fp = _fpstate(xstate, layout) if xstate else b""
    frame = bytearray(FPSTATE_OFFSET + len(fp))
    struct.pack_into("<QQ", frame, UC_OFFSET,
                     UC_FP_XSTATE | UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS if fp else UC_SIGCONTEXT_SS, 0)
    _SIGCONTEXT.pack_into(
        frame, MCONTEXT_OFFSET,
        r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15, r.rdi, r.rsi, r.rbp, r.rbx,
        r.rdx, r.rax, r.rcx, r.rsp, r.rip, r.eflags,
        r.cs & 0xFFFF, r.gs & 0xFFFF, r.fs & 0xFFFF, r.ss & 0xFFFF,
        0, 0, 0, 0, frame_addr + FPSTATE_OFFSET if fp else 0)
    struct.pack_into("<Q", frame, SIGMASK_OFFSET, sigmask)
    frame[FPSTATE_OFFSET:] = fp
    return bytes(frame)
