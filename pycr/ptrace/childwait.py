"""Sleeping until a child or tracee changes state, with a timeout: SIGCHLD through a signalfd.

The kernel sends the tracer SIGCHLD at every ptrace stop and exit of a tracee (and the
parent at a child's exit), unless SIGCHLD is ignored or has SA_NOCLDSTOP. While
SIGCHLD is blocked in the waiting thread it stays pending and a signalfd reports it;
so a waitpid(WNOHANG) after blocking and a poll of the signalfd miss nothing. This
only holds if no other thread can take the signal (it is process-directed): with
another thread that does not block SIGCHLD, or a SIGCHLD handler or ignore set,
usable() is False and the caller polls. (The C core's helper threads live only
within one call of it.) The other threads are looked for in /proc/self/task, as
the kernel sees them: one that Python's threading does not list (started by C
code, or by _thread) takes the signal too, and each wait would then sleep until
its whole timeout. Threads that block it (faulthandler's watchdog) are no obstacle.
"""

import ctypes
import os
import select
import signal
import threading

from pycr.abi import NR
from pycr.native import core

_SFD_NONBLOCK, _SFD_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
_SIGINFO = 128            # struct signalfd_siginfo
_fd = None


def usable():
    """True if SIGCHLD reaches this thread, and nobody else wants it: every other thread of
    pycr blocks it, and it has its default disposition (sent for stops too, no handler to starve)."""
    if signal.getsignal(signal.SIGCHLD) != signal.SIG_DFL:
        return False
    me = threading.get_native_id()
    for name in os.listdir("/proc/self/task"):
        if int(name) != me and not _blocks_sigchld(name):
            return False
    return True


def _blocks_sigchld(tid):
    """Whether thread tid of this process has SIGCHLD blocked (a thread gone meanwhile: True)."""
    try:
        with open(f"/proc/self/task/{tid}/status") as f:
            for line in f:
                if line.startswith("SigBlk:"):
                    return bool(int(line.split()[1], 16) >> (signal.SIGCHLD - 1) & 1)
    except (FileNotFoundError, ProcessLookupError):
        return True
    return False


def _signalfd():
    global _fd
    if _fd is None:
        mask = ctypes.c_uint64(1 << (signal.SIGCHLD - 1))
        _fd = core.syscall(NR["signalfd4"], -1, ctypes.addressof(mask), 8, _SFD_NONBLOCK | _SFD_CLOEXEC)
    return _fd


class SigchldBlocked:
    """Context: SIGCHLD blocked in this thread, and pending ones readable; wait(seconds)
    sleeps until one arrives (True) or the time is up (False)."""

    def __enter__(self):
        self.fd = _signalfd()
        self.old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        self.poller = select.poll()
        self.poller.register(self.fd, select.POLLIN)
        return self

    def wait(self, seconds):
        if not self.poller.poll(max(seconds, 0.0) * 1000):
            return False
        try:
            while os.read(self.fd, _SIGINFO * 8):
                pass
        except BlockingIOError:
            pass
        return True

    def __exit__(self, *exc):
        signal.pthread_sigmask(signal.SIG_SETMASK, self.old)
        return False
