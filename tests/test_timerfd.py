"""timerfds come back on their clock: a periodic one keeps firing at its interval, a one-shot
fires about when it should, an absolute one at its time, unread expirations are read."""

import json
import signal

import procutil
from checkpointing import dump_and_show, migrated
from pycrcmd import pycr

TIMER_SCRIPT = r"""#!{python}
import ctypes, os, select, signal, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
st = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
def report(line):
    os.write(st, (line + "\n").encode())
NS = 10**9
def settime(fd, value_ns, interval_ns=0, flags=0):
    its = struct.pack("<qqqq", interval_ns // NS, interval_ns % NS, value_ns // NS, value_ns % NS)
    assert libc.timerfd_settime(fd, flags, its, None) == 0, ctypes.get_errno()
def gettime(fd):
    buf = ctypes.create_string_buffer(32)
    libc.timerfd_gettime(fd, buf)
    i_s, i_ns, v_s, v_ns = struct.unpack("<qqqq", buf.raw)
    return v_s * NS + v_ns, i_s * NS + i_ns
MONOTONIC, REALTIME, BOOTTIME_ALARM = 1, 0, 9
periodic = libc.timerfd_create(MONOTONIC, os.O_NONBLOCK)
settime(periodic, 50_000_000, 50_000_000)
oneshot = libc.timerfd_create(BOOTTIME_ALARM, 0)             # an alarm clock (root has CAP_WAKE_ALARM)
settime(oneshot, 3 * NS)
absolute = libc.timerfd_create(REALTIME, 0)
at = time.clock_gettime_ns(time.CLOCK_REALTIME) + 4 * NS
settime(absolute, at, 0, 1)                                  # TFD_TIMER_ABSTIME
unread = libc.timerfd_create(MONOTONIC, 0)
settime(unread, 100_000_000, 100_000_000)
time.sleep(0.45)                                             # 4 expirations, not read
count = struct.unpack("<Q", os.read(periodic, 8))[0]
report("started %d" % time.monotonic_ns())
report("ready %d" % os.getpid())
want = []
signal.signal(signal.SIGUSR1, lambda *a: want.append(1))
while not want:
    time.sleep(0.01)
report("unread %d" % struct.unpack("<Q", os.read(unread, 8))[0])
try:
    os.read(periodic, 8)                                     # what expired while it waited for the signal
except BlockingIOError:
    pass
t0 = time.monotonic_ns()
ticks = []
while len(ticks) < 10:
    select.select([periodic], [], [])
    ticks.append(struct.unpack("<Q", os.read(periodic, 8))[0])
report("periodic %d ms %d ticks" % ((time.monotonic_ns() - t0) // 10**6, sum(ticks)))
left = gettime(oneshot)[0]
report("oneshot left %d ms" % (left // 10**6))
n = struct.unpack("<Q", os.read(oneshot, 8))[0]
report("oneshot fired %d after %d ms" % (n, (time.monotonic_ns() - t0) // 10**6))
n = struct.unpack("<Q", os.read(absolute, 8))[0]
report("absolute fired %d late %d ms" % (n, (time.clock_gettime_ns(time.CLOCK_REALTIME) - at) // 10**6))
while True:
    time.sleep(0.1)
"""


def test_timers_fire_after_restore(spawn_python, tmp_path, cleanup_pids):
    w = spawn_python("timerfd", TIMER_SCRIPT)
    w.wait_for(r"^ready \d+$")
    dump_dir, shown = dump_and_show(w.pid, tmp_path, cleanup_pids, "timerfd")
    unread = unread_ticks(shown)
    pycr("restore", "-D", dump_dir, "-d")
    start = w.mark()
    procutil.kill(w.pid, signal.SIGUSR1)
    check_timers(w, start, unread)


def test_timers_through_migrate(spawn_python, tmp_path, cleanup_pids):
    w = spawn_python("timerfd", TIMER_SCRIPT)
    w.wait_for(r"^ready \d+$")
    root, _ = migrated(w.pid, cleanup_pids, "--max-passes", 3, "--min-delta", "0", "--work-dir", tmp_path / "work")
    start = w.mark()
    procutil.kill(root, signal.SIGUSR1)         # at once: each 100 ms until the read is one more expiration
    final = sorted((tmp_path / "work").iterdir())[-1]
    shown = pycr("show", final / "timerfd.img", "--json").stdout
    check_timers(w, start, unread_ticks(shown))


def unread_ticks(shown):
    """The unread expirations the image holds for the workload's 100 ms timer."""
    timers = json.loads(shown)["body"]["timerfds"]
    return next(t["ticks"] for t in timers if t["interval_ns"] == 100_000_000)


def check_timers(w, start, unread):
    """What the restored program (root or not: a replica is another PID) reports after SIGUSR1."""
    # The unread expirations of the dump, and at most a few since the restore (100 ms each).
    got = int(w.wait_for(r"^unread (\d+)$", start=start, root=False).group(1))
    assert unread >= 4 and unread <= got <= unread + 3, (unread, got)
    # Ten reads of a 50 ms timer: about 500 ms and ten expirations.
    ms, ticks = map(int, w.wait_for(r"^periodic (\d+) ms (\d+) ticks$", start=start, root=False).groups())
    assert 400 <= ms <= 1500 and 10 <= ticks <= ms // 50 + 1, (ms, ticks)
    # 3 s from its start, less the time before the dump and the periodic reads; the time the tree
    # spent dumped does not count for a relative timer.
    left = int(w.wait_for(r"^oneshot left (\d+) ms$", start=start, root=False).group(1))
    assert 500 <= left <= 2800, left
    fired, after = map(int, w.wait_for(r"^oneshot fired (\d+) after (\d+) ms$", timeout=10, start=start,
                                       root=False).groups())
    assert fired == 1 and ms + left - 100 <= after <= ms + left + 500, (ms, left, after)
    fired, late = map(int, w.wait_for(r"^absolute fired (\d+) late (-?\d+) ms$", timeout=10, start=start,
                                      root=False).groups())
    assert fired == 1 and 0 <= late <= 500, late          # at its absolute time, not shifted
