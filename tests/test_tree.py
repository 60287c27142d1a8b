"""The shape of a tree across dump and restore: unreaped zombies, a leader that
exited before its threads, fd tables shared by processes, and session members
that left the tree. Each test checks what the program itself would see."""

import os
import signal
import subprocess
import sys

import procutil
from pycrcmd import one_line_error, pycr
from pycr import abi
from pycr.native import core


def dump(w, imgdir, *extra):
    pycr("dump", "-t", w.pid, "-D", imgdir, *extra)


def restore(imgdir, cleanup_pids, pids, *extra, expect=0):
    cleanup_pids.add(*pids)
    return pycr("restore", "-D", imgdir, "-d", *extra, expect=expect)


def test_zombies_come_back_unreaped_with_their_status(spawn, tmp_path, cleanup_pids):
    w = spawn("zombie", 42, "sig:15")
    zombies = [int(f[0]) for f in w.fields("zombie")]
    assert [procutil.state(z) for z in zombies] == ["Z", "Z"]
    dump(w, tmp_path / "img")
    assert not any(procutil.exists(p) for p in [w.pid, *zombies])   # their PIDs are free again
    restore(tmp_path / "img", cleanup_pids, [w.pid, *zombies])
    for z in zombies:
        assert procutil.state(z) == "Z" and procutil.ppid(z) == w.pid
    procutil.assert_running_untraced(w.pid)
    mark = w.mark()
    w.signal_and_wait(signal.SIGUSR1, r"^chld \d+$")
    reaped = w.lines(mark)
    # waitpid in the restored parent gets each child with the status it died with,
    # then ECHILD; and the parent's SIGCHLD handler saw nothing new.
    assert f"reaped {zombies[0]} exited 42" in reaped
    assert f"reaped {zombies[1]} signaled 15" in reaped
    assert "reaped none 10" in reaped
    assert "chld 2" in reaped
    assert not any(procutil.exists(z) for z in zombies)


def test_zombie_leader_threads_go_on(spawn, tmp_path, cleanup_pids):
    """The main thread left with pthread_exit: the restored process again has a
    zombie leader, its threads run, and its parent gets the group's exit status."""
    w = spawn("zleader", ready=False)
    w.wait_for(rf"^ready {w.pid}$", root=False)       # the root is a zombie
    tids = w.threads()
    assert len(tids) == 3 and procutil.state(w.pid) == "Z"
    dump(w, tmp_path / "img")
    cleanup_pids.add(w.pid)
    mark = w.mark()
    # Restored in the foreground: pycr waits for the root and exits with its status.
    runner = subprocess.Popen([sys.executable, "-m", "pycr", "restore", "-D", tmp_path / "img"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert procutil.wait_until(lambda: procutil.exists(w.pid) and w.threads() == tids
                                   and procutil.tracer_pid(tids[1]) == 0), "no restored threads"
        assert procutil.state(w.pid) == "Z"
        for tid in tids[1:]:
            assert procutil.state(w.pid, tid) in ("R", "S")
            first = len(w.fields(f"count {tid}", mark))
            w.wait_for(rf"^count {tid} \d+$", start=mark + first, root=False)
            assert int(w.fields(f"count {tid}", mark)[-1][0]) > 1, "the counter started over"
        w.signal(signal.SIGUSR1)
        w.wait_for(rf"^usr1 ({tids[1]}|{tids[2]})$", start=mark, root=False)
        w.signal(signal.SIGUSR2)           # exit_group(7) in whichever thread takes it
        assert runner.wait(timeout=30) == 7
    finally:
        if runner.poll() is None:
            runner.kill()
        runner.communicate()


def test_shared_fd_table_stays_shared(spawn, tmp_path, cleanup_pids):
    w = spawn("sharedfd")
    child = int(w.fields("child")[0][0])
    assert core.kcmp(w.pid, child, abi.KCMP_FILES) == 0
    dump(w, tmp_path / "img")
    restore(tmp_path / "img", cleanup_pids, [w.pid, child])
    procutil.assert_running_untraced(w.pid, child)
    # What one process opens, the other has: one fd table, as before.
    w.signal_and_wait(signal.SIGUSR1, rf"^opened {child} 41$", pid=child)
    w.signal_and_wait(signal.SIGUSR2, rf"^has {w.pid} 0 1$")
    w.signal_and_wait(signal.SIGUSR1, rf"^opened {w.pid} 40$")
    w.signal_and_wait(signal.SIGUSR2, rf"^has {child} 1 1$", pid=child)


def test_fd_table_shared_by_siblings_alone_is_refused(spawn, tmp_path):
    """Two children share a table their parent unshared: a restore cannot fork
    that, so the dump says so by name and leaves the tree running."""
    w = spawn("sharedfd", "siblings")
    a, b = (int(f[0]) for f in w.fields("child"))
    assert core.kcmp(a, b, abi.KCMP_FILES) == 0 != core.kcmp(w.pid, a, abi.KCMP_FILES)
    out = pycr("dump", "-t", w.pid, "-D", tmp_path / "img", expect=1)
    assert one_line_error(out) == (f"pycr: pids {min(a, b)} and {max(a, b)} share one fd table (CLONE_FILES) "
                                   "but neither is the other's parent: not supported")
    procutil.assert_running_untraced(w.pid, a, b)


def test_session_member_outside_the_tree_is_refused(spawn, tmp_path, cleanup_pids):
    w = spawn("orphan")
    orphan = int(w.fields("orphan")[0][0])
    cleanup_pids.add(orphan)
    assert procutil.sid(orphan) == w.pid and procutil.ppid(orphan) not in w.pids()
    out = pycr("dump", "-t", w.pid, "-D", tmp_path / "img", expect=1)
    line = one_line_error(out)
    assert f"pid {orphan} (pycr-orphan)" in line and f"session {w.pid}" in line
    assert not os.path.exists(tmp_path / "img" / "inventory.img")
    # Nothing was killed: both go on counting, untraced.
    procutil.assert_running_untraced(w.pid, orphan)
    mark = w.mark()
    for pid in (w.pid, orphan):
        w.wait_for(rf"^count {pid} \d+$", start=mark)
