"""eventfds come back with their counter, their mode and their fd flags."""

import signal

from pycrcmd import pycr

EVENTFD_SCRIPT = """#!{python}
import fcntl, os, signal, sys, time
st = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
def report(line):
    os.write(st, (line + "\\n").encode())
plain = os.eventfd(7, 0)               # Python defaults to EFD_CLOEXEC
sem = os.eventfd(3, os.EFD_SEMAPHORE | os.EFD_NONBLOCK)
big = os.eventfd(0, os.EFD_CLOEXEC)
os.eventfd_write(big, 2**64 - 2)
dup = os.dup(plain)
want = []
signal.signal(signal.SIGUSR1, lambda *a: want.append(1))
report("ready %d" % os.getpid())
while not want:
    time.sleep(0.01)
os.eventfd_write(dup, 1)                 # through the shared description
got = [os.eventfd_read(plain), os.eventfd_read(sem), os.eventfd_read(sem), os.eventfd_read(big)]
nonblock = [bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK) for fd in (plain, sem)]
cloexec = [bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC) for fd in (plain, big)]
report("got %s nonblock %s cloexec %s" % (got, nonblock, cloexec))
while True:
    time.sleep(0.1)
"""


def test_eventfd_counter_mode_and_flags_come_back(spawn_python, tmp_path, cleanup_pids):
    w = spawn_python("eventfd", EVENTFD_SCRIPT)
    dump_dir = tmp_path / "img"
    pycr("dump", "-t", w.pid, "-D", dump_dir)
    cleanup_pids.add(w.pid)
    shown = pycr("show", dump_dir / "eventfd.img", "--json").stdout
    assert '"eventfd"' in shown and '"count": 7' in shown
    pycr("restore", "-D", dump_dir, "-d")
    got = w.signal_and_wait(signal.SIGUSR1, r"^got (.*)$", timeout=10)
    # 7 + 1 written through the dup; the semaphore gives 1 per read; the full counter comes back.
    assert got.group(1) == f"[8, 1, 1, {2**64 - 2}] nonblock [False, True] cloexec [False, True]"
