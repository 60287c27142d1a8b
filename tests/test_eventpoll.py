"""epoll sets come back with every registration, at the program's own fd numbers.

The workload is an epoll loop over pipes and eventfds, with a level-triggered
registration left pending, a fired EPOLLONESHOT one (disarmed), an
edge-triggered one whose edge it consumed, EPOLLEXCLUSIVE and EPOLLWAKEUP
registrations, an epoll watching another, and a set shared with a child that
registered an fd of its own. After the restore it checks what epoll_wait
reports, then goes on: new events with the right data, ET and ONESHOT as the
kernel does them, and EPOLL_CTL_MOD/DEL on its own fd numbers.
"""

import signal

import pytest

import procutil
from checkpointing import dump_and_show
from pycrcmd import one_line_error, pycr

PRELUDE = r"""#!{python}
import ctypes, os, signal, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
st = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
def report(line):
    os.write(st, (line + "\n").encode())
IN, OUT, ET, ONESHOT, EXCL, WAKEUP = 1, 4, 1 << 31, 1 << 30, 1 << 28, 1 << 29
ADD, DEL, MOD = 1, 2, 3
def ctl(ep, op, fd, events=0, data=0):
    ev = ctypes.create_string_buffer(struct.pack("<IQ", events & 0xFFFFFFFF, data))
    if libc.epoll_ctl(ep, op, fd, ev) < 0:
        return "E%d" % ctypes.get_errno()
    return "ok"
def wait(ep, timeout=0):
    buf = ctypes.create_string_buffer(12 * 16)
    n = libc.epoll_wait(ep, buf, 16, timeout)
    return sorted(struct.unpack_from("<IQ", buf, 12 * i)[1] for i in range(n))
want = []
signal.signal(signal.SIGUSR1, lambda *a: want.append(1))
def wait_signal():
    while not want:
        time.sleep(0.01)
    want.pop()
"""

LOOP_SCRIPT = PRELUDE + r"""
ep = libc.epoll_create1(0)
ep_et = libc.epoll_create1(0)
ep2 = libc.epoll_create1(0)
r1, w1 = os.pipe()                      # level-triggered, left pending
eo = os.eventfd(0)                      # one-shot that fires and is not re-armed
rx, wx = os.pipe()                      # EPOLLEXCLUSIVE
ew = os.eventfd(0)                      # EPOLLWAKEUP
et = os.eventfd(0)                      # edge-triggered, edge consumed (in a set that is then idle)
rq, wq = os.pipe()                      # edge-triggered, never ready
ctl(ep, ADD, r1, IN, 0x1111000000000001)
ctl(ep, ADD, eo, IN | ONESHOT, 2)
ctl(ep, ADD, rx, IN | EXCL, 3)
ctl(ep, ADD, ew, IN | WAKEUP, 4)
ctl(ep_et, ADD, et, IN | ET, 5)
ctl(ep_et, ADD, rq, IN | ET, 6)
ctl(ep2, ADD, ep, IN, 7)                # an epoll watching another
os.write(w1, b"abc")
os.eventfd_write(eo, 1)
os.eventfd_write(et, 1)
report("before %s %s %s" % (wait(ep), wait(ep_et), wait(ep2)))
# Shared with a child after fork; the child registers an eventfd of its own.
child = os.fork()
if child == 0:
    ec = os.eventfd(0)
    ctl(ep, ADD, ec, IN, 77)
    report("child %d ec %d" % (os.getpid(), ec))
    wait_signal()
    os.eventfd_write(ec, 1)
    report("child wrote")
    while True:
        time.sleep(0.1)
report("ready %d" % os.getpid())
wait_signal()
report("after %s %s %s" % (wait(ep), wait(ep_et), wait(ep2)))
os.read(r1, 3)
os.write(wx, b"x")
os.eventfd_write(et, 1)
os.eventfd_write(ew, 1)
report("new %s %s" % (wait(ep), wait(ep_et)))
report("again %s %s" % (wait(ep), wait(ep_et)))
report("mod %s %s" % (ctl(ep, MOD, eo, IN | ONESHOT, 8), wait(ep)))
report("oneshot %s" % wait(ep))
os.eventfd_read(ew)
os.read(rx, 1)
wait_signal()
report("shared %s" % wait(ep, 2000))
report("del %s %s %s" % (ctl(ep, DEL, eo), ctl(ep, DEL, r1), ctl(ep_et, DEL, et)))
os.write(w1, b"z")
report("gone %s %s" % (wait(ep), ctl(ep, DEL, eo)))
while True:
    time.sleep(0.1)
"""

EXPECTED_BEFORE = f"before [2, {0x1111000000000001}] [5] [7]"


def run_loop(w, restore_dir=None):
    """Drive the restored loop and check each of its reports."""
    got = w.signal_and_wait(signal.SIGUSR1, r"^after (.*)$")
    # Pending level-triggered data is reported again with its 64-bit data; the fired one-shot stays
    # disarmed; the consumed edge does not fire again; the nested set sees the pending one.
    assert got.group(1) == f"[{0x1111000000000001}] [] [7]"
    new = w.wait_for(r"^new (.*)$").group(1)
    assert new == "[3, 4] [5]"                    # exclusive pipe, wakeup eventfd; the new edge once
    assert w.wait_for(r"^again (.*)$").group(1) == "[3, 4] []"   # level-triggered stay, the edge does not
    assert w.wait_for(r"^mod (.*)$").group(1) == "ok [3, 4, 8]"   # re-armed one-shot, with its new data
    assert w.wait_for(r"^oneshot (.*)$").group(1) == "[3, 4]"     # and disarmed again after firing
    child = int(w.wait_for(r"^child (\d+) ec").group(1))
    start = w.mark()
    procutil.kill(child, signal.SIGUSR1)
    w.wait_for(r"^child wrote$", start=start)
    got = w.signal_and_wait(signal.SIGUSR1, r"^shared (.*)$")
    assert got.group(1) == "[77]"                 # the child's own registration in the shared set
    assert w.wait_for(r"^del (.*)$").group(1) == "ok ok ok"
    assert w.wait_for(r"^gone (.*)$").group(1) == "[77] E2"      # r1 is no longer watched; the child's stays


def test_epoll_loop_goes_on_after_restore(spawn_python, tmp_path, cleanup_pids):
    w = spawn_python("epoll", LOOP_SCRIPT)
    assert w.wait_for(r"^before (.*)$").group(0) == EXPECTED_BEFORE
    w.wait_for(r"^child \d+ ec \d+$")
    dump_dir, shown = dump_and_show(w.pid, tmp_path, cleanup_pids, "eventpoll")
    assert '"events": 1073741824' in shown          # the fired one-shot: EPOLLONESHOT alone
    pycr("restore", "-D", dump_dir, "-d")
    run_loop(w)


def test_epoll_through_a_pre_dump_chain(spawn_python, tmp_path, cleanup_pids):
    w = spawn_python("epoll", LOOP_SCRIPT)
    w.wait_for(r"^child \d+ ec \d+$")
    pycr("pre-dump", "-t", w.pid, "-D", tmp_path / "1")
    pycr("dump", "-t", w.pid, "-D", tmp_path / "2", "--prev-images-dir", "../1")
    cleanup_pids.add(w.pid)
    pycr("restore", "-D", tmp_path / "2", "-d")
    run_loop(w)


CLOSED_SCRIPT = PRELUDE + r"""
ep = libc.epoll_create1(0)
r, w = os.pipe()
d = os.dup(r)
ctl(ep, ADD, d, IN, 1)
os.close(d)                             # the registration stays: the file is still open as r
report("fd %d watched %d" % (ep, d))
report("ready %d" % os.getpid())
while True:
    time.sleep(0.05)
"""


def test_registration_of_a_closed_fd_is_refused(spawn_python, tmp_path):
    w = spawn_python("epoll-closed", CLOSED_SCRIPT)
    m = w.wait_for(r"^fd (\d+) watched (\d+)$")
    proc = pycr("dump", "-t", w.pid, "-D", tmp_path / "img", expect=1)
    assert one_line_error(proc) == (f"pycr: pid {w.pid} fd {m.group(1)}: epoll watches fd {m.group(2)}, which the "
                                    "process has closed (the file is still open elsewhere)")
    procutil.assert_running_untraced(w.pid)
