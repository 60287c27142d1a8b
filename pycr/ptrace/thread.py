"""One seized thread: stop it, wait for it, read and write its CPU state.

Only PTRACE_SEIZE is used (never ATTACH): it sends no SIGSTOP, so the target's
own job-control state is left alone and stops are told apart by their event.
"""

import ctypes
import errno
import os
import signal
import time
from dataclasses import dataclass

from pycr.abi import NR, SIGINFO_SIZE, WALL
from pycr.errors import PycrError, StopTimeout, TaskGone
from pycr.proc.status import status
from pycr.ptrace import binding as B, childwait
from pycr.ptrace import xstate as X

_SYSCALL_INFO_SIZE = 88      # struct ptrace_syscall_info; entry.nr / exit.rval at 24


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_SYS_TGKILL = NR["tgkill"]


def _tgkill(tgid, tid, sig):
    res = _libc.syscall(ctypes.c_long(_SYS_TGKILL), ctypes.c_long(tgid), ctypes.c_long(tid),
                        ctypes.c_long(sig))
    if res != 0:
        err = ctypes.get_errno()
        if err == errno.ESRCH:
            raise TaskGone(tid, "tgkill")
        raise PycrError(f"tid {tid}: tgkill({sig}): {os.strerror(err)}")


class user_regs_struct(ctypes.Structure):
    """x86_64 struct user_regs_struct, field names as in the kernel."""
    _fields_ = [(name, ctypes.c_ulonglong) for name in (
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
        "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base",
        "gs_base", "ds", "es", "fs", "gs")]

    def to_dict(self):
        return {name: getattr(self, name) for name, _ in self._fields_}

    @classmethod
    def from_dict(cls, values):
        regs = cls()
        for name, value in values.items():
            setattr(regs, name, value & 0xFFFFFFFFFFFFFFFF)
        return regs

    def copy(self):
        return user_regs_struct.from_buffer_copy(self)

    def __eq__(self, other):
        return bytes(self) == bytes(other)


class _iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _peeksiginfo_args(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("nr", ctypes.c_int32)]


class _rseq_config(ctypes.Structure):
    _fields_ = [("rseq_abi_pointer", ctypes.c_uint64), ("rseq_abi_size", ctypes.c_uint32),
                ("signature", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


@dataclass
class Stop:
    """What waitpid reported for a thread."""
    tid: int
    status: int

    @property
    def exited(self):
        return os.WIFEXITED(self.status)

    @property
    def killed(self):
        return os.WIFSIGNALED(self.status)

    @property
    def gone(self):
        return self.exited or self.killed

    @property
    def stopped(self):
        return os.WIFSTOPPED(self.status)

    @property
    def signal(self):
        """Stop signal, or the terminating signal of a killed task, else 0."""
        if self.stopped:
            return os.WSTOPSIG(self.status)
        if self.killed:
            return os.WTERMSIG(self.status)
        return 0

    @property
    def event(self):
        return (self.status >> 16) & 0xFF if self.stopped else 0

    @property
    def is_group_stop(self):
        """A job-control stop (SIGSTOP/SIGTSTP/...) reported under SEIZE."""
        return self.event == B.EVENT_STOP and self.signal != signal.SIGTRAP

    @property
    def is_interrupt_stop(self):
        return self.event == B.EVENT_STOP and self.signal == signal.SIGTRAP

    @property
    def is_signal_delivery(self):
        """A signal about to be delivered: it must be passed on with cont/detach."""
        return self.stopped and self.event == 0 and self.signal != (signal.SIGTRAP | 0x80)

    def __repr__(self):
        if self.exited:
            return f"Stop(tid={self.tid}, exited={os.WEXITSTATUS(self.status)})"
        if self.killed:
            return f"Stop(tid={self.tid}, killed={self.signal})"
        return f"Stop(tid={self.tid}, signal={self.signal}, event={self.event})"


class Thread:
    """A thread seen through ptrace; most calls require it to be in a ptrace stop."""

    def __init__(self, tid):
        self.tid = tid
        # Signals taken from signal-delivery stops while we held the thread;
        # they must be passed back when it is released (see freeze.thaw).
        self.held_signals = []
        self.held_siginfos = []   # their 128-byte siginfos, same order
        self.last_stop = None     # the Stop of the most recent wait()

    def __repr__(self):
        return f"Thread({self.tid})"

    def _call(self, req, addr=0, data=0):
        return B.ptrace(req, self.tid, addr, data)

    # attach / run control
    def seize(self, options=0):
        """PTRACE_SEIZE; syscall stops always report SIGTRAP|0x80 (the injector tells
        them apart from a real SIGTRAP by it)."""
        self._call(B.SEIZE, 0, options | B.O_TRACESYSGOOD)

    def interrupt(self):
        self._call(B.INTERRUPT)

    def cont(self, sig=0):
        self._call(B.CONT, 0, sig)

    def singlestep(self, sig=0):
        self._call(B.SINGLESTEP, 0, sig)

    def syscall(self, sig=0):
        """Resume until the next syscall-entry or syscall-exit stop."""
        self._call(B.SYSCALL, 0, sig)

    def syscall_info(self):
        """(op, value) of PTRACE_GET_SYSCALL_INFO: op is SYSCALL_INFO_ENTRY with the
        syscall number, SYSCALL_INFO_EXIT with the signed return value, or another op."""
        buf = ctypes.create_string_buffer(_SYSCALL_INFO_SIZE)
        self._call(B.GET_SYSCALL_INFO, _SYSCALL_INFO_SIZE, ctypes.addressof(buf))
        op = buf.raw[0]
        value = ctypes.c_int64.from_buffer_copy(buf.raw, 24).value
        return op, value

    def to_interrupt_stop(self):
        """From a syscall stop to an interrupt stop (or a job-control stop) -> the Stop reached.

        The kernel restarts a syscall the task was interrupted in (rax = -ERESTART*)
        only on its signal path, after a stop inside get_signal; from a
        syscall-exit stop it would return -ERESTART* to the program. PTRACE_INTERRUPT
        then PTRACE_CONT traps the task there before it runs any instruction.
        A signal that comes meanwhile is held for release()."""
        self.interrupt()
        while True:
            self.cont()
            stop = self.wait()
            if stop.gone or stop.is_interrupt_stop or stop.is_group_stop:
                return stop
            if stop.event:
                continue
            if stop.signal & 0x7F == signal.SIGTRAP and self.syscall_info()[0] != B.SYSCALL_INFO_NONE:
                continue
            self.hold_signal(stop)

    def detach(self, sig=0):
        self._call(B.DETACH, 0, sig)

    def listen(self):
        self._call(B.LISTEN)

    def event_msg(self):
        msg = ctypes.c_ulong()
        self._call(B.GETEVENTMSG, 0, ctypes.addressof(msg))
        return msg.value

    def wait(self, timeout=None):
        """waitpid(tid, __WALL) -> Stop; raises StopTimeout after timeout seconds."""
        if timeout is None:
            try:
                _, status = os.waitpid(self.tid, WALL)
            except ChildProcessError:
                raise TaskGone(self.tid, "not waitable") from None
            self.last_stop = Stop(self.tid, status)
            return self.last_stop
        deadline = time.monotonic() + timeout
        if childwait.usable():
            with childwait.SigchldBlocked() as sigchld:
                while True:
                    stop = self._wait_nohang()
                    if stop is not None:
                        return stop
                    if not sigchld.wait(deadline - time.monotonic()):
                        break
            stop = self._wait_nohang()
            if stop is not None:
                return stop
            raise StopTimeout(f"tid {self.tid}: no ptrace stop within {timeout} s")
        delay = 0.0001      # another thread may take SIGCHLD: poll with a backoff
        while True:
            stop = self._wait_nohang()
            if stop is not None:
                return stop
            if time.monotonic() >= deadline:
                raise StopTimeout(f"tid {self.tid}: no ptrace stop within {timeout} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.01)

    def _wait_nohang(self):
        """waitpid(tid, __WALL|WNOHANG) -> Stop, or None if there is no news."""
        try:
            pid, status = os.waitpid(self.tid, WALL | os.WNOHANG)
        except ChildProcessError:
            raise TaskGone(self.tid, "not waitable") from None
        if not pid:
            return None
        self.last_stop = Stop(self.tid, status)
        return self.last_stop

    def get_siginfo(self):
        """The siginfo of the signal this thread is stopped for (128 bytes)."""
        buf = ctypes.create_string_buffer(SIGINFO_SIZE)
        self._call(B.GETSIGINFO, 0, ctypes.addressof(buf))
        return buf.raw

    def hold_signal(self, stop):
        """Record the signal of a signal-delivery stop so that release() passes it on."""
        try:
            info = self.get_siginfo()
        except PycrError:
            info = b""
        self.held_signals.append(stop.signal)
        self.held_siginfos.append(info)

    def requeue_held(self):
        """Make the held signals pending again now (the thread must have them blocked),
        so that they are not lost even if pycr dies before release()."""
        sigs = list(self.held_signals)
        self.held_signals.clear()
        self.held_siginfos.clear()
        tgid = status(self.tid).tgid if sigs else None
        for sig in sigs:
            _tgkill(tgid, self.tid, sig)

    def release(self):
        """Detach, passing on every held signal: the first through the detach
        itself when the thread sits in a signal-delivery stop (the kernel takes
        the detach signal only there), the others re-sent with tgkill first.
        A thread in a job-control stop stays stopped."""
        sigs = list(self.held_signals)
        self.held_signals.clear()
        self.held_siginfos.clear()
        first = 0
        if sigs and self.last_stop is not None and self.last_stop.is_signal_delivery:
            first = sigs.pop(0)
        try:
            tgid = None
            for sig in sigs:
                if tgid is None:
                    tgid = status(self.tid).tgid
                _tgkill(tgid, self.tid, sig)
        finally:
            self.detach(first)

    # CPU state
    def get_regs(self):
        regs = user_regs_struct()
        self._call(B.GETREGS, 0, ctypes.addressof(regs))
        return regs

    def set_regs(self, regs):
        if isinstance(regs, dict):
            regs = user_regs_struct.from_dict(regs)
        self._call(B.SETREGS, 0, ctypes.addressof(regs))

    def get_xstate(self):
        """The NT_X86_XSTATE regset, exactly as long as the kernel says.

        GETREGSET silently truncates a short buffer, so the buffer is sized
        from CPUID (an upper bound) and the length the kernel returns is kept.
        """
        size = X.regset_buffer_size()
        buf = ctypes.create_string_buffer(size)
        iov = _iovec(ctypes.addressof(buf), size)
        self._call(B.GETREGSET, B.NT_X86_XSTATE, ctypes.addressof(iov))
        return buf.raw[: iov.len]

    def set_xstate(self, data):
        buf = ctypes.create_string_buffer(bytes(data), len(data))
        iov = _iovec(ctypes.addressof(buf), len(data))
        self._call(B.SETREGSET, B.NT_X86_XSTATE, ctypes.addressof(iov))

    def get_sigmask(self):
        mask = ctypes.c_uint64()
        self._call(B.GETSIGMASK, 8, ctypes.addressof(mask))
        return mask.value

    def set_sigmask(self, mask):
        value = ctypes.c_uint64(mask & 0xFFFFFFFFFFFFFFFF)
        self._call(B.SETSIGMASK, 8, ctypes.addressof(value))

    def peek_siginfo(self, shared=False):
        """Pending siginfos (128 bytes each) of this thread, or of its process."""
        out = []
        batch = 32
        buf = ctypes.create_string_buffer(SIGINFO_SIZE * batch)
        while True:
            args = _peeksiginfo_args(len(out), B.PEEKSIGINFO_SHARED if shared else 0, batch)
            n = self._call(B.PEEKSIGINFO, ctypes.addressof(args), ctypes.addressof(buf))
            raw = buf.raw
            out.extend(raw[i * SIGINFO_SIZE:(i + 1) * SIGINFO_SIZE] for i in range(n))
            if n < batch:
                return out

    def rseq_config(self):
        """(rseq_abi_pointer, rseq_abi_size, signature); all 0 if none registered."""
        conf = _rseq_config()
        self._call(B.GET_RSEQ_CONFIGURATION, ctypes.sizeof(conf), ctypes.addressof(conf))
        return conf.rseq_abi_pointer, conf.rseq_abi_size, conf.signature

    def seccomp_filters(self):
        """The classic BPF programs of this task's seccomp filters, oldest first.

        PTRACE_SECCOMP_GET_FILTER index 0 is the newest filter, so the walk is
        reversed. Each item is the raw sock_filter array (8 bytes per insn).
        """
        progs = []
        index = 0
        while True:
            count, err = B.ptrace_errno(B.SECCOMP_GET_FILTER, self.tid, index, 0)
            if err in (errno.ENOENT,) or (err == errno.EINVAL and index == 0):
                break   # past the last filter, or not in filter mode at all
            if err:
                raise B.error(B.SECCOMP_GET_FILTER, self.tid, err)
            buf = ctypes.create_string_buffer(count * 8)
            self._call(B.SECCOMP_GET_FILTER, index, ctypes.addressof(buf))
            progs.append(buf.raw)
            index += 1
        progs.reverse()
        return progs
