"""Interval timers (setitimer) and POSIX timers (timer_create) go on firing after a restore.

The workloads count their own signals and report how many arrived in one
second once asked (SIGUSR1); POSIX timers are made with the raw syscalls
(ctypes), so the IDs the program holds are the kernel's, and it asks
timer_gettime on them after the restore.
"""

import json
import logging
import os
import re
import signal
import time

import procutil
from pycrcmd import pycr

ITIMER_SCRIPT = """#!{python}
import os, signal, sys, time
st = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
def report(line):
    os.write(st, (line + "\\n").encode())
ticks = [0]
asked = []
signal.signal(signal.SIGALRM, lambda *a: ticks.__setitem__(0, ticks[0] + 1))
signal.signal(signal.SIGUSR1, lambda *a: asked.append(1))
signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)
signal.setitimer(signal.ITIMER_VIRTUAL, 1000, 0)        # never due: only its reading counts
report("ready %d" % os.getpid())
while True:
    time.sleep(0.01)
    if asked:
        asked.clear()
        first = ticks[0]
        time.sleep(1.0)
        real = signal.getitimer(signal.ITIMER_REAL)
        virtual = signal.getitimer(signal.ITIMER_VIRTUAL)
        report("ticks %d interval %.3f virtual %.1f" % (ticks[0] - first, real[1], virtual[0]))
"""

POSIX_SCRIPT = """#!{python}
import ctypes, os, signal, struct, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
st = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
def report(line):
    os.write(st, (line + "\\n").encode())
SIGEV_SIGNAL, SIGEV_THREAD_ID = 0, 4
SIG_PROC, SIG_THREAD, SIG_ONCE = signal.SIGRTMIN + 1, signal.SIGRTMIN + 2, signal.SIGRTMIN + 3
def timer_create(clock, signo, notify, tid=0, value=0):
    ev = ctypes.create_string_buffer(struct.pack("<Qiii44x", value, signo, notify, tid))
    out = ctypes.c_int(-1)
    if libc.syscall(222, clock, ev, ctypes.byref(out)) != 0:
        raise OSError(ctypes.get_errno(), "timer_create")
    return out.value
def timer_settime(timer, value, interval):
    ns = lambda s: (int(s), int(round(s % 1 * 1e9)))
    spec = ctypes.create_string_buffer(struct.pack("<qqqq", *ns(interval), *ns(value)))
    if libc.syscall(223, timer, 0, spec, None) != 0:
        raise OSError(ctypes.get_errno(), "timer_settime")
def timer_gettime(timer):
    spec = ctypes.create_string_buffer(32)
    if libc.syscall(224, timer, spec) != 0:
        return "errno %d" % ctypes.get_errno()
    isec, insec, vsec, vnsec = struct.unpack("<qqqq", spec.raw)
    return "%.3f/%.3f" % (vsec + vnsec / 1e9, isec + insec / 1e9)

hits = {{"proc": 0, "thread": 0}}
once = []
asked = []
signal.signal(SIG_ONCE, lambda *a: once.append(time.monotonic()))
signal.signal(signal.SIGUSR1, lambda *a: asked.append(1))
# Blocked in every thread and taken with sigtimedwait, so that each signal counts once
# (Python runs a handler once for signals that arrive before it gets to it).
signal.pthread_sigmask(signal.SIG_BLOCK, [SIG_PROC, SIG_THREAD])
tids = []
def worker(sig, key):
    tids.append(threading.get_native_id())
    while True:
        if signal.sigtimedwait([sig], 1) is not None:
            hits[key] += 1
threading.Thread(target=worker, args=(SIG_THREAD, "thread"), daemon=True).start()
while not tids:
    time.sleep(0.01)
threading.Thread(target=worker, args=(SIG_PROC, "proc"), daemon=True).start()
# Some timers made and deleted first, so that the IDs kept are not 0, 1, 2.
for _ in range(3):
    libc.syscall(226, timer_create(1, SIG_PROC, SIGEV_SIGNAL))
t_proc = timer_create(1, SIG_PROC, SIGEV_SIGNAL, value=0x1234)
t_thread = timer_create(1, SIG_THREAD, SIGEV_THREAD_ID, tid=tids[0])
t_once = timer_create(1, SIG_ONCE, SIGEV_SIGNAL)
timer_settime(t_proc, 0.02, 0.02)
timer_settime(t_thread, 0.02, 0.02)
timer_settime(t_once, 4.0, 0)
report("ids %d %d %d worker %d" % (t_proc, t_thread, t_once, tids[0]))
report("ready %d" % os.getpid())
while True:
    time.sleep(0.01)
    if once and once[-1] is not None:
        report("once %d at %.3f" % (len(once), once[-1]))
        once.append(None)
    if asked:
        asked.clear()
        before = dict(hits)
        time.sleep(1.0)
        report("hits %d %d gettime %s %s %s" % (hits["proc"] - before["proc"], hits["thread"] - before["thread"],
               timer_gettime(t_proc), timer_gettime(t_thread), timer_gettime(t_once)))
"""


def show_json(path):
    return json.loads(pycr("show", path, "--json").stdout)["body"]


def test_itimer_real_goes_on_at_its_rate(spawn_python, tmp_path, cleanup_pids):
    w = spawn_python("itimer", ITIMER_SCRIPT)
    dump_dir = tmp_path / "img"
    pycr("dump", "-t", w.pid, "-D", dump_dir)
    cleanup_pids.add(w.pid)
    real, virtual, prof = show_json(dump_dir / f"core-{w.pid}.img")["itimers"]
    # value 0: it expired while frozen, SIGALRM pending (the kernel re-arms it at delivery)
    assert real["interval_us"] == 50_000 and 0 <= real["value_us"] <= 50_000
    assert 999 * 10**6 < virtual["value_us"] <= 1001 * 10**6 and prof == {"value_us": 0, "interval_us": 0}
    pycr("restore", "-D", dump_dir, "-d")
    got = w.signal_and_wait(signal.SIGUSR1, r"^ticks (\d+) interval (\S+) virtual (\S+)$", timeout=10)
    # 20 SIGALRMs a second; a loaded 2-CPU machine may lose a few to scheduling
    assert 12 <= int(got.group(1)) <= 24, got.group(0)
    assert got.group(2) == "0.050" and float(got.group(3)) > 998


def posix_timers_of(pid):
    """{ID: (signal, notify)} from /proc/PID/timers."""
    out, cur = {}, {}
    with open(f"/proc/{pid}/timers") as f:
        for line in f:
            key, _, value = line.partition(":")
            cur[key] = value.strip()
            if key == "ClockID":
                out[int(cur["ID"])] = (cur["signal"], cur["notify"])
    return out


def check_posix_timers_come_back(w, restored_at):
    ids = w.fields("ids")[0]
    t_proc, t_thread, t_once, worker = (int(x) for x in (ids[0], ids[1], ids[2], ids[4]))
    assert t_proc >= 3
    got = w.signal_and_wait(signal.SIGUSR1, r"^hits (\d+) (\d+) gettime (\S+) (\S+) (\S+)$", timeout=10)
    proc_hits, thread_hits = int(got.group(1)), int(got.group(2))
    # 50 a second each; allow for a loaded machine
    assert 35 <= proc_hits <= 55 and 35 <= thread_hits <= 55, got.group(0)
    assert got.group(3).endswith("/0.020") and got.group(4).endswith("/0.020"), got.group(0)
    timers = posix_timers_of(w.pid)
    assert set(timers) == {t_proc, t_thread, t_once}
    assert timers[t_proc][0].endswith("/0000000000001234") and timers[t_proc][1] == f"signal/pid.{w.pid}"
    assert timers[t_thread][1] == f"signal/tid.{worker}"
    return got


def test_posix_timers_keep_ids_and_fire(spawn_python, tmp_path, cleanup_pids):
    w = spawn_python("posix-timers", POSIX_SCRIPT)
    dump_dir = tmp_path / "img"
    pycr("dump", "-t", w.pid, "-D", dump_dir)
    cleanup_pids.add(w.pid)
    assert not w.lines() or not any(line.startswith("once") for line in w.lines())
    saved = show_json(dump_dir / "timers.img")["processes"][0]["timers"]
    once_left = max(t["value_ns"] for t in saved if t["interval_ns"] == 0) / 1e9
    assert 1.0 < once_left < 4.0
    pycr("restore", "-D", dump_dir, "-d")
    restored_at = time.monotonic()
    check_posix_timers_come_back(w, restored_at)
    fired = w.wait_for(r"^once (\d+) at (\S+)$", timeout=10)
    # due once_left after the restore, not counting the time the tree was stopped
    assert int(fired.group(1)) == 1
    assert restored_at + once_left - 0.3 <= float(fired.group(2)) <= restored_at + once_left + 1.5, \
        (restored_at, once_left, fired.group(0))
    time.sleep(0.5)
    assert w.fields("once")[0][0] == "1" and len([x for x in w.lines() if x.startswith("once")]) == 1


def test_posix_timers_through_migrate(spawn_python, tmp_path, cleanup_pids):
    """pycr migrate: the replica (same PIDs in a new PID namespace) has the timers, with their IDs."""
    w = spawn_python("posix-timers-migrate", POSIX_SCRIPT)
    proc = pycr("migrate", "-t", w.pid, "--max-passes", 3, "--work-dir", tmp_path / "work")
    m = re.search(r"\(pid (\d+) outside its namespace, namespace init (\d+)\)", proc.stdout)
    assert m, proc.stdout
    root, init = int(m.group(1)), int(m.group(2))
    cleanup_pids.add(init, root)
    assert not procutil.exists(w.pid) or procutil.state(w.pid) in ("Z", "X")
    start = w.mark()
    os.kill(root, signal.SIGUSR1)
    got = w.wait_for(r"^hits (\d+) (\d+) gettime (\S+) (\S+) (\S+)$", start=start, root=False, timeout=10)
    assert 35 <= int(got.group(1)) <= 55 and 35 <= int(got.group(2)) <= 55, got.group(0)
    assert got.group(3).endswith("/0.020") and got.group(4).endswith("/0.020"), got.group(0)
    assert set(posix_timers_of(root)) == {int(x) for x in w.fields("ids")[0][:3]}


def test_posix_timer_ids_come_back_in_order_without_the_prctl(spawn_python, tmp_path, cleanup_pids, monkeypatch,
                                                              caplog):
    """The fallback for kernels before PR_TIMER_CREATE_RESTORE_IDS, run on this one: the
    restore creates timers in ID order (IDs 0-2 were deleted by the program, so it holds
    placeholders for them) and the kernel's sequential allocation gives the IDs back."""
    from pycr.restore import restorer, timers
    w = spawn_python("posix-timers-in-order", POSIX_SCRIPT)
    dump_dir = tmp_path / "img"
    pycr("dump", "-t", w.pid, "-D", dump_dir)
    cleanup_pids.add(w.pid)
    monkeypatch.setattr(timers, "restore_ids_supported", lambda: False)
    with caplog.at_level(logging.INFO, logger="pycr"):
        assert restorer.restore(str(dump_dir), detach=True) == 0
    assert "3 POSIX timers made again with their IDs (created in ID order)" in caplog.text
    check_posix_timers_come_back(w, time.monotonic())
