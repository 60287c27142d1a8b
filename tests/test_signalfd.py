"""signalfds come back with their mask and flags; a signal sent after the restore is read from them."""

import ctypes
import os
import signal

from checkpointing import dump_and_show
from pycrcmd import pycr

libc = ctypes.CDLL(None, use_errno=True)


class Sigval(ctypes.Union):
    _fields_ = [("sival_int", ctypes.c_int), ("sival_ptr", ctypes.c_void_p)]

SIGNALFD_SCRIPT = r"""#!{python}
import ctypes, fcntl, os, signal, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
st = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
def report(line):
    os.write(st, (line + "\n").encode())
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2, signal.SIGRTMIN + 1])
def make(sigs, flags):
    mask = ctypes.c_uint64(sum(1 << (s - 1) for s in sigs))
    return libc.signalfd(-1, ctypes.byref(mask), flags)
usr2 = make([signal.SIGUSR2], os.O_NONBLOCK)
rt = make([signal.SIGRTMIN + 1], os.O_CLOEXEC)
def take(fd):
    try:
        info = os.read(fd, 128)
    except BlockingIOError:
        return "none"
    signo, errno_, code, pid, uid = struct.unpack_from("<IiiII", info)
    value = struct.unpack_from("<i", info, 44)[0]           # ssi_int
    return "%d/%d" % (signo, value)
os.kill(os.getpid(), signal.SIGUSR2)                         # pending in the task at the dump
want = []
signal.signal(signal.SIGUSR1, lambda *a: want.append(1))
report("ready %d" % os.getpid())
while not want:
    time.sleep(0.01)
got = [take(usr2), take(usr2)]
nonblock = [bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK) for fd in (usr2, rt)]
cloexec = [bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC) for fd in (usr2, rt)]
report("got %s nonblock %s cloexec %s" % (got, nonblock, cloexec))
report("rt %s" % take(rt))                                   # blocks until the test queues it
while True:
    time.sleep(0.1)
"""


def test_signalfd_reads_signals_sent_after_restore(spawn_python, tmp_path, cleanup_pids):
    w = spawn_python("signalfd", SIGNALFD_SCRIPT)
    w.wait_for(r"^ready \d+$")
    dump_dir, shown = dump_and_show(w.pid, tmp_path, cleanup_pids, "signalfd")
    assert f'"sigmask": {1 << (signal.SIGUSR2 - 1)}' in shown
    pycr("restore", "-D", dump_dir, "-d")
    got = w.signal_and_wait(signal.SIGUSR1, r"^got (.*)$").group(1)
    # The SIGUSR2 pending at the dump is read once; the flags are the program's own.
    assert got == f"['{signal.SIGUSR2}/0', 'none'] nonblock [True, False] cloexec [False, True]"
    # A signal queued after the restore, with a value, is read from the blocking signalfd.
    assert libc.sigqueue(w.pid, signal.SIGRTMIN + 1, Sigval(4242)) == 0, os.strerror(ctypes.get_errno())
    assert w.wait_for(r"^rt (.*)$").group(1) == f"{signal.SIGRTMIN + 1}/4242"
