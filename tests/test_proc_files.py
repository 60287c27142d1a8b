"""Files under /proc/PID of the dumped tree, held open by its tasks."""

import signal

import procutil
from pycrcmd import pycr
from workload_prelude import SLEEPING_CHILD, WORKLOAD_PRELUDE

PROC_SCRIPT = WORKLOAD_PRELUDE + SLEEPING_CHILD + r"""own = os.open("/proc/self/status", os.O_RDONLY)          # resolves to /proc/<pid>/status
kid = os.open("/proc/%d/stat" % child, os.O_RDONLY)
os.read(own, 10)                                         # a position to keep
want = []
signal.signal(signal.SIGUSR1, lambda *a: want.append(1))
report("child %d" % child)
report("ready %d" % os.getpid())
while True:
    if want:
        want.clear()
        pos = os.lseek(own, 0, os.SEEK_CUR)
        os.lseek(own, 0, os.SEEK_SET)
        status = dict(l.split(":", 1) for l in os.read(own, 8192).decode().splitlines() if ":" in l)
        kid_pid = os.pread(kid, 100, 0).split()[0].decode()
        report("proc pos %d pid %s state %s kid %s" % (pos, status["Pid"].strip(), status["State"].split()[0], kid_pid))
    time.sleep(0.01)
"""


def test_files_under_proc_of_the_tree_are_opened_again(spawn_python, tmp_path, cleanup_pids):
    w = spawn_python("procfiles", PROC_SCRIPT)
    child = int(w.wait_for(r"^child (\d+)$").group(1))
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img")
    cleanup_pids.add(w.pid, child)
    pycr("restore", "-D", tmp_path / "img", "-d")
    got = w.signal_and_wait(signal.SIGUSR1, r"^proc pos (\d+) pid (\d+) state (\w) kid (\d+)$").groups()
    # The restored task reads its own status (not pycr's, not a stale one), from where it was.
    assert got == ("10", str(w.pid), "R", str(child))
    targets = procutil.fds(w.pid).values()
    assert f"/proc/{w.pid}/status" in targets and f"/proc/{child}/stat" in targets
