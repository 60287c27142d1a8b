"""flock, POSIX record and OFD locks are held again after a restore (--file-locks).

The workload takes one lock of each kind (and a forked child shares the
flock'd and OFD-locked descriptions); after the restore the test, a process
outside the tree, is refused every one of them, and once the restored owner
unlocks (SIGUSR1) it gets them all.
"""

import errno
import fcntl
import os
import signal
import struct

import pytest

import procutil
from pycrcmd import one_line_error, pycr

FLOCK = struct.Struct("<hhxxxxqqi4x")       # struct flock

LOCKS_SCRIPT = """#!{python}
import fcntl, os, signal, struct, sys, time
FLOCK = struct.Struct("<hhxxxxqqi4x")
st = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
def report(line):
    os.write(st, (line + "\\n").encode())
fa = os.open("a.lock", os.O_RDWR | os.O_CREAT, 0o644)
fb = os.open("b.lock", os.O_RDWR | os.O_CREAT, 0o644)
fc = os.open("c.lock", os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fa, fcntl.LOCK_EX)
fcntl.fcntl(fb, fcntl.F_SETLK, FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 10, 10, 0))
fcntl.fcntl(fb, fcntl.F_SETLK, FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, 100, 0, 0))
fcntl.fcntl(fc, fcntl.F_OFD_SETLK, FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 4096, 0))
child = os.fork()
if child == 0:                    # shares fa's and fc's descriptions, and so their locks
    while True:
        time.sleep(0.1)
asked = []
signal.signal(signal.SIGUSR1, lambda *a: asked.append(1))
report("child %d" % child)
report("ready %d" % os.getpid())
while not asked:
    time.sleep(0.01)
fcntl.flock(fa, fcntl.LOCK_UN)
fcntl.fcntl(fb, fcntl.F_SETLK, FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0))
fcntl.fcntl(fc, fcntl.F_OFD_SETLK, FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0))
report("unlocked")
while True:
    time.sleep(0.1)
"""


def try_locks(workdir):
    """What a process outside the tree gets for each lock: 'held' (EAGAIN) or 'free'."""
    out = {}

    def attempt(name, how):
        fd = os.open(os.path.join(workdir, name), os.O_RDWR)
        try:
            how(fd)
            return "free"
        except OSError as exc:
            assert exc.errno in (errno.EAGAIN, errno.EACCES), exc
            return "held"
        finally:
            os.close(fd)        # drops whatever this test process took

    out["flock"] = attempt("a.lock", lambda fd: fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB))
    out["posix write"] = attempt("b.lock", lambda fd: fcntl.fcntl(
        fd, fcntl.F_SETLK, FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, 15, 1, 0)))
    out["posix gap"] = attempt("b.lock", lambda fd: fcntl.fcntl(
        fd, fcntl.F_SETLK, FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 20, 80, 0)))
    out["posix read"] = attempt("b.lock", lambda fd: fcntl.fcntl(
        fd, fcntl.F_SETLK, FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 1 << 40, 1, 0)))
    out["posix shared"] = attempt("b.lock", lambda fd: fcntl.fcntl(
        fd, fcntl.F_SETLK, FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, 100, 0, 0)))
    out["ofd"] = attempt("c.lock", lambda fd: fcntl.fcntl(
        fd, fcntl.F_OFD_SETLK, FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, 4095, 1, 0)))
    return out


def lock_pids(path):
    """{(class, pid)} of the /proc/locks lines on the file at path."""
    st = os.stat(path)
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with open("/proc/locks") as f:
        return {(line.split()[1], int(line.split()[4])) for line in f if line.split()[5] == want}


HELD = {"flock": "held", "posix write": "held", "posix gap": "free", "posix read": "held",
        "posix shared": "free", "ofd": "held"}
FREE = dict.fromkeys(HELD, "free")


def test_locks_are_held_again_and_the_owner_can_unlock(spawn_python, tmp_path, cleanup_pids):
    w = spawn_python("locks", LOCKS_SCRIPT)
    child = int(w.fields("child")[0][0])
    assert try_locks(tmp_path) == HELD
    dump_dir = tmp_path / "img"
    pycr("dump", "-t", w.pid, "-D", dump_dir, "--file-locks")
    cleanup_pids.add(w.pid, child)
    assert try_locks(tmp_path) == FREE          # the tree is gone, and its locks with it
    shown = pycr("show", dump_dir / "file-locks.img", "--json").stdout
    assert shown.count('"kind"') == 4 + 1      # the image's own kind line, then 4 locks (shared ones once)
    pycr("restore", "-D", dump_dir, "-d")
    assert try_locks(tmp_path) == HELD
    # the POSIX locks belong to the restored process again (OFD locks show pid -1)
    assert lock_pids(tmp_path / "b.lock") == {("POSIX", w.pid)}
    assert lock_pids(tmp_path / "a.lock") == {("FLOCK", w.pid)}
    w.signal_and_wait(signal.SIGUSR1, r"^unlocked$")
    assert try_locks(tmp_path) == FREE


def test_a_tree_holding_a_lock_is_refused_without_file_locks(spawn_python, tmp_path):
    w = spawn_python("locks", LOCKS_SCRIPT)
    dump_dir = tmp_path / "img"
    proc = pycr("dump", "-t", w.pid, "-D", dump_dir, expect=1)
    line = one_line_error(proc)
    assert f"pid {w.pid} fd " in line and "lock on " in line and "--file-locks" in line, line
    assert not dump_dir.exists() or not os.listdir(dump_dir)
    procutil.assert_running_untraced(w.pid)
    assert try_locks(tmp_path) == HELD


def test_a_lock_taken_meanwhile_by_another_process_fails_the_restore(spawn_python, tmp_path, cleanup_pids):
    w = spawn_python("locks", LOCKS_SCRIPT)
    child = int(w.fields("child")[0][0])
    dump_dir = tmp_path / "img"
    pycr("dump", "-t", w.pid, "-D", dump_dir, "--file-locks")
    cleanup_pids.add(w.pid, child)
    fd = os.open(tmp_path / "a.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        line = one_line_error(pycr("restore", "-D", dump_dir, "-d", expect=1))
        assert "a.lock" in line and "FLOCK write lock" in line and "outside the tree" in line, line
        assert not procutil.exists(w.pid) and not procutil.exists(child)
    finally:
        os.close(fd)
    pycr("restore", "-D", dump_dir, "-d")
    assert try_locks(tmp_path) == HELD
