"""Running syscalls inside a ptrace-stopped thread.

The thread's registers, extended state and signal mask are saved first and put
back by restore(), so the task cannot tell anything ran. Two trampolines:
- default: a `syscall` (0f 05) found in the task's [vdso], stepped with
  PTRACE_SINGLESTEP; writes no memory.
- given address of `0f 05 cc` (the restore stub): PTRACE_CONT until the int3.
All signals are blocked while injecting so that none turns a step into a
signal stop; one that still arrives (SIGSTOP cannot be blocked) is recorded in
thread.held_signals for re-delivery at detach, never dropped.
"""

import contextlib
import os
import signal

from pycr.errors import PycrError, TaskGone, from_oserror
from pycr.ptrace import binding as B
from pycr.ptrace import syscalls as S
from pycr import proc

MAP_PRIVATE = 0x02
MAP_ANONYMOUS = 0x20
PROT_READ = 1
PROT_WRITE = 2
_U64 = 0xFFFFFFFFFFFFFFFF
_ARG_REGS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")


def _signed(value):
    return value - (1 << 64) if value & (1 << 63) else value


class Injector:
    """Runs syscalls in `thread` (already in a ptrace stop); use as a context manager
    or call restore() when done."""

    def __init__(self, thread, trampoline=None, keep_xstate=True):
        self.thread = thread
        self.tid = thread.tid
        self.pid = proc.status(self.tid).tgid
        self.trampoline = trampoline
        self.keep_xstate = keep_xstate
        self.events = []          # (ptrace event, event message) seen during calls (fork, clone)
        self._saved = None
        self._mem = None

    # save / restore
    def save(self):
        if self._saved is not None:
            return
        t = self.thread
        regs = t.get_regs()
        xstate = t.get_xstate() if self.keep_xstate else None
        mask = t.get_sigmask()
        self._saved = (regs, xstate, mask)
        t.set_sigmask(_U64)
        if self.trampoline is None:
            self._syscall_insn = self._find_vdso_syscall()

    def restore(self):
        """Put back the registers, extended state and signal mask saved at the first call."""
        if self._mem is not None:
            os.close(self._mem)
            self._mem = None
        if self._saved is None:
            return
        regs, xstate, mask = self._saved
        self._saved = None
        t = self.thread
        t.set_regs(regs)
        if xstate is not None:
            t.set_xstate(xstate)
        t.set_sigmask(mask)

    def __enter__(self):
        self.save()
        return self

    def __exit__(self, *exc):
        try:
            self.restore()
        except TaskGone:
            if exc[0] is None:
                raise
        return False

    @property
    def saved_regs(self):
        self.save()
        return self._saved[0].copy()

    def _find_vdso_syscall(self):
        for vma in proc.maps(self.pid):
            if vma.kind == "vdso":
                code = self.read(vma.start, vma.size)
                at = code.find(b"\x0f\x05")
                if at >= 0:
                    return vma.start + at
        raise PycrError(f"pid {self.pid}: no syscall instruction in [vdso]; pass a trampoline")

    # syscalls
    def call(self, nr, *args):
        """Run syscall nr with up to 6 args; the raw result (negative = -errno)."""
        if isinstance(nr, str):
            nr = S.NR[nr]
        if len(args) > 6:
            raise ValueError("a syscall takes at most 6 arguments")
        self.save()
        t = self.thread
        regs = self._saved[0].copy()
        regs.rax = nr
        regs.orig_rax = _U64          # -1: no syscall-restart fixups on our return
        for name, value in zip(_ARG_REGS, args):
            setattr(regs, name, value & _U64)
        addr = self._syscall_insn if self.trampoline is None else self.trampoline
        end = addr + (2 if self.trampoline is None else 3)
        regs.rip = addr
        t.set_regs(regs)
        while True:
            if self.trampoline is None:
                t.singlestep()
            else:
                t.cont()
            stop = t.wait()
            if stop.gone:
                raise TaskGone(self.tid, f"died during injected syscall {S.NAMES.get(nr, nr)}")
            if stop.event in (B.EVENT_FORK, B.EVENT_VFORK, B.EVENT_CLONE, B.EVENT_VFORK_DONE):
                self.events.append((stop.event, t.event_msg()))
                continue
            if stop.event:                       # interrupt or group stop: just go on
                continue
            if stop.signal == signal.SIGTRAP:
                now = t.get_regs()
                if now.rip == end:
                    return _signed(now.rax)
                if now.rip == addr:              # not executed yet (spurious trap)
                    continue
                raise PycrError(f"tid {self.tid}: injected syscall {S.NAMES.get(nr, nr)} "
                                f"trapped at {now.rip:#x}, expected {end:#x}")
            if stop.signal in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL) and \
                    t.get_regs().rip == addr:
                raise PycrError(f"tid {self.tid}: trampoline {addr:#x} is not executable "
                                f"(signal {stop.signal})")
            t.hold_signal(stop)   # passed on at detach, never dropped

    def check(self, nr, *args):
        """Like call(), but a negative result raises the mapped pycr error."""
        res = self.call(nr, *args)
        if res < 0:
            name = nr if isinstance(nr, str) else S.NAMES.get(nr, str(nr))
            raise from_oserror(OSError(-res, os.strerror(-res)), self.pid,
                               f"injected {name}")
        return res

    @contextlib.contextmanager
    def scratch(self, size=4096):
        """A private RW anonymous mapping in the target for the duration of the block."""
        addr = self.check("mmap", 0, size, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        try:
            yield addr
        finally:
            self.check("munmap", addr, size)

    # memory
    def _memfd(self):
        if self._mem is None:
            try:
                self._mem = os.open(f"/proc/{self.pid}/mem", os.O_RDWR)
            except OSError as exc:
                raise from_oserror(exc, self.pid, "mem") from None
        return self._mem

    def read(self, addr, n):
        try:
            data = os.pread(self._memfd(), n, addr)
        except OSError as exc:
            raise from_oserror(exc, self.pid, f"read {n} bytes at {addr:#x}") from None
        if len(data) != n:
            raise PycrError(f"pid {self.pid}: short read at {addr:#x}")
        return data

    def write(self, addr, data):
        try:
            done = os.pwrite(self._memfd(), bytes(data), addr)
        except OSError as exc:
            raise from_oserror(exc, self.pid, f"write {len(data)} bytes at {addr:#x}") from None
        if done != len(data):
            raise PycrError(f"pid {self.pid}: short write at {addr:#x}")
