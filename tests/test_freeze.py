"""freeze(): whole trees stopped, thawed, killed; signals kept; failures roll back."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import procutil
from pycr import proc
from pycr.errors import AccessDenied, StopTimeout, TaskGone
from pycr.freeze import freeze
from pycr.ptrace import childwait
from pycr.ptrace.inject import Injector
from pycr.ptrace.thread import Thread
from helpers_ptrace import (COUNTER_C, FORKER_C, TREE_C, Proc, build, free_pid,
                            state_and_tracer, wait_state)


@pytest.fixture(scope="module")
def exes(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("bin"))
    return {"counter": build(d, "counter", COUNTER_C), "tree": build(d, "tree", TREE_C),
            "forker": build(d, "forker", FORKER_C)}


@pytest.fixture
def start(exes):
    started = []

    def _start(name, *args):
        p = Proc([exes[name], *args])
        started.append(p)
        assert p.readline(10).startswith("ready")
        return p
    yield _start
    for p in started:
        p.kill()


def all_tids(pids):
    return {tid: pid for pid in pids for tid in proc.tasks(pid)}


def assert_frozen(tree, pids):
    for tid in all_tids(pids):
        state, tracer = state_and_tracer(tid)
        assert (state, tracer) == ("t", os.getpid()), tid


def assert_running(pids):
    for tid in all_tids(pids):
        state, tracer = state_and_tracer(tid)
        assert tracer == 0 and state in "RS", (tid, state, tracer)


def test_tree_of_five_processes_one_with_four_threads(start):
    p = start("tree")
    pids = proc.descendants(p.pid)
    assert len(pids) == 5
    with freeze(p.pid) as tree:
        assert sorted(tree.processes) == sorted(pids)
        assert sorted(len(ts) for ts in tree.processes.values()) == [1, 1, 1, 1, 4]
        for pid, threads in tree.processes.items():
            assert threads[0].tid == pid
        assert tree.pids[0] == p.pid
        assert_frozen(tree, pids)
        # Kept: nothing resuming is not an event; this gives a task wrongly let go
        # (these tasks spin or nap 2 ms) time to show up as running.
        time.sleep(0.05)
        assert_frozen(tree, pids)        # nothing resumed by itself
    assert_running(pids)


def test_thaw_keeps_counter_correct_and_delivers_signal(start):
    p = start("counter", "3")
    before = p.report()
    tree = freeze(p.pid)
    try:
        os.kill(p.pid, signal.SIGUSR1)
        assert procutil.wait_until(lambda: signal.SIGUSR1 in procutil.pending_signals(p.pid)), \
            "SIGUSR1 never became pending"
        assert state_and_tracer(p.pid) == ("t", os.getpid())
    finally:
        tree.thaw()
    after = p.report_until(lambda r: r["usr1"] > before["usr1"])
    assert after["usr1"] == before["usr1"] + 1
    assert after["a"] > before["a"] and after["bad"] == 0


def test_signal_delivery_stop_is_passed_on(start):
    p = start("counter")
    with freeze(p.pid) as tree:
        t = tree.processes[p.pid][0]
        os.kill(p.pid, signal.SIGUSR1)
        t.cont()                            # let it run into the signal-delivery stop
        stop = t.wait(5)
        assert stop.is_signal_delivery and stop.signal == signal.SIGUSR1
        t.hold_signal(stop)
    assert p.report()["usr1"] == 1


def test_injection_inside_frozen_tree(start):
    p = start("counter", "1")
    with freeze(p.pid) as tree:
        for t in tree.processes[p.pid]:
            regs, xs = t.get_regs(), t.get_xstate()
            with Injector(t) as inj:
                if t.tid == p.pid:
                    os.kill(p.pid, signal.SIGUSR1)   # arrives while all signals are blocked
                assert inj.call("getpid") == p.pid
                assert inj.call("gettid") == t.tid
            assert t.get_regs() == regs and t.get_xstate() == xs
    r = p.report_until(lambda r: r["usr1"] >= 1)
    assert r["usr1"] == 1 and r["bad"] == 0


def test_forking_tree_is_frozen_consistently(start):
    p = start("forker")
    for _ in range(5):
        with freeze(p.pid) as tree:
            pids = proc.descendants(p.pid)
            assert p.pid in tree.processes
            for pid in pids:
                for tid in proc.tasks(pid):
                    state, tracer = state_and_tracer(tid)
                    if state == "Z" or state is None:
                        continue
                    assert tid in tree.threads and (state, tracer) == ("t", os.getpid())
            # Kept: no birth is not an event; unfrozen, the forker forks every ~0.2 ms.
            time.sleep(0.02)
            assert proc.descendants(p.pid) == pids          # nothing new was born
        for pid in tree.processes:
            assert state_and_tracer(pid)[1] in (0, None)
        # Thawed, it forks again before the next freeze.
        assert procutil.wait_until(lambda: set(proc.descendants(p.pid)) - set(pids)), "the forker did not go on"


def test_sigstopped_task_stays_stopped(start):
    p = start("counter")
    os.kill(p.pid, signal.SIGSTOP)
    wait_state(p.pid, "T")
    with freeze(p.pid) as tree:
        assert tree.job_stopped == {p.pid}
        assert state_and_tracer(p.pid)[1] == os.getpid()
    # Kept: staying stopped is not an event; a task wrongly resumed by the thaw
    # (the counter spins) has this long to show up as running.
    time.sleep(0.05)
    assert state_and_tracer(p.pid) == ("T", 0)
    os.kill(p.pid, signal.SIGCONT)
    assert p.report()["bad"] == 0


def test_kill_removes_every_pid(start):
    p = start("tree")
    pids = proc.descendants(p.pid)
    tree = freeze(p.pid)
    tree.kill()
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}")


def test_bad_pid():
    with pytest.raises(TaskGone):
        freeze(free_pid())


TRACER = textwrap.dedent("""
    import sys
    from pycr.ptrace.thread import Thread
    Thread(int(sys.argv[1])).seize()
    print("seized", flush=True)
    sys.stdin.read()
""")


def test_already_traced_is_access_denied_and_rolls_back(start):
    p = start("tree")
    pids = proc.descendants(p.pid)
    victim = pids[-1]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(proc.__file__)))
    other = subprocess.Popen([sys.executable, "-c", TRACER, str(victim)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, env=env, close_fds=True)
    try:
        assert other.stdout.readline().strip() == b"seized"
        with pytest.raises(AccessDenied, match=f"pid {victim} is already traced by pid {other.pid}"):
            freeze(p.pid)
        for pid in pids:
            if pid != victim:
                assert_running([pid])
    finally:
        other.kill()
        other.wait(10)
        other.stdin.close()
        other.stdout.close()


def test_sigchld_wait_is_not_used_beside_a_thread_threading_does_not_list():
    """Such a thread (started by C code or _thread) can take the SIGCHLD a stop wait sleeps on:
    each wait would then last its whole timeout (a freeze, 10 s), so waits must poll."""
    import _thread
    assert childwait.usable(), f"threads of this process: {os.listdir('/proc/self/task')}"
    done = threading.Event()
    count, tasks = threading.active_count(), len(os.listdir("/proc/self/task"))
    _thread.start_new_thread(done.wait, ())
    try:
        # (A new thread starts with every signal blocked, until it takes its creator's mask.)
        assert procutil.wait_until(lambda: not childwait.usable()), "a thread that can take SIGCHLD was missed"
        assert threading.active_count() == count
    finally:
        done.set()
    assert procutil.wait_until(lambda: len(os.listdir("/proc/self/task")) == tasks)
    assert childwait.usable()


@pytest.mark.time_limit(10)        # a wait that never returns fails the test instead of hanging it
def test_stop_wait_sleeps_until_the_stop_or_exit_and_keeps_its_timeout(start):
    p = start("counter")
    assert childwait.usable()          # the SIGCHLD path, not the polling fallback
    t = Thread(p.pid)
    t.seize()
    began = time.monotonic()
    with pytest.raises(StopTimeout):
        t.wait(0.3)                    # seized, running: no stop to report
    assert time.monotonic() - began >= 0.3
    t.interrupt()
    assert t.wait(5).is_interrupt_stop
    os.kill(p.pid, signal.SIGKILL)
    assert t.wait(5).gone              # its death, collected by the tracer
