"""Resource limits: as many as the kernel has, and a limit from a newer kernel refused by name."""

import resource

from pycr.manifest import reseal

import procutil
from pycrcmd import one_line_error, pycr
from test_restore import stub_tasks

INF = 2**64 - 1


def limits_rows(pid):
    with open(f"/proc/{pid}/limits") as f:
        return f.read().splitlines()[1:]


def _dump_counter(spawn, tmp_path):
    w = spawn("counter")
    w.wait_for(r"^count 2$")
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img")
    return w


def _add_limit(tmp_path, pid, cur, mx):
    from pycr.images import ImageDir
    img = ImageDir(tmp_path / "img")
    core = img.read("core", pid)
    core.rlimits.append(dict(cur=cur, max=mx))
    img.write("core", core, pid)
    reseal(img.path)                      # an edit on purpose: only the range checks stand now
    return len(core.rlimits) - 1


def test_every_limit_of_the_kernel_is_saved(spawn, tmp_path):
    from pycr.images import ImageDir
    w = spawn("counter")
    resource.prlimit(w.pid, resource.RLIMIT_NOFILE, (123, 456))
    rows = limits_rows(w.pid)
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img", "-R")
    core = ImageDir(tmp_path / "img").read("core", w.pid)
    assert len(core.rlimits) == len(rows)
    assert (core.rlimits[resource.RLIMIT_NOFILE].cur, core.rlimits[resource.RLIMIT_NOFILE].max) == (123, 456)


def test_limit_unknown_here_is_refused_by_name(spawn, tmp_path, cleanup_pids):
    w = _dump_counter(spawn, tmp_path)
    res = _add_limit(tmp_path, w.pid, 10, 20)
    before = stub_tasks()
    cleanup_pids.add(w.pid)
    line = one_line_error(pycr("restore", "-D", tmp_path / "img", "-d", expect=1))
    assert f"rlimit {res} (10/20) is not known to this kernel" in line
    assert stub_tasks() == before
    assert not procutil.exists(w.pid)


def test_unlimited_limit_unknown_here_is_left_out(spawn, tmp_path, cleanup_pids):
    w = _dump_counter(spawn, tmp_path)
    _add_limit(tmp_path, w.pid, INF, INF)
    mark = w.mark()
    cleanup_pids.add(w.pid)
    pycr("restore", "-D", tmp_path / "img", "-d")
    w.wait_for(r"^count \d+$", start=mark)
    rows = limits_rows(w.pid)
    assert len(rows) == len(limits_rows("self"))
    procutil.assert_running_untraced(w.pid)


def test_parse_limits_takes_every_row():
    """A kernel with one more limit than today's: its row is read too."""
    from pycr.proc.misc import parse_limits
    with open("/proc/self/limits") as f:
        text = f.read()
    text += "Max future thing          5                    10                   things    \n"
    got = parse_limits(text)
    assert len(got) == len(limits_rows("self")) + 1
    assert got[-1] == (5, 10)


HOLDS_FD_ABOVE_ITS_LIMIT = r"""#!{python}
import os, resource, sys, time
st = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
os.dup2(st, 50)
os.close(st)
resource.setrlimit(resource.RLIMIT_NOFILE, (8, 8))     # below fd 50, as sshd's privsep child does
os.write(50, b"ready %d\n" % os.getpid())
n = 0
while True:
    n += 1
    os.write(50, b"count %d\n" % n)
    time.sleep(0.02)
"""


def test_an_fd_above_its_own_hard_limit_comes_back(spawn_python, tmp_path, cleanup_pids):
    """A program may lower RLIMIT_NOFILE under an fd it holds. The dump ended such a tree and the restore
    then called its files.img corrupt: the process was lost. Its fds come back before its limits."""
    w = spawn_python("lowfd", HOLDS_FD_ABOVE_ITS_LIMIT)
    w.wait_for(r"^count 3$")
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img")
    cleanup_pids.add(w.pid)
    mark = w.mark()
    pycr("restore", "-D", tmp_path / "img", "-d")
    w.wait_for(r"^count \d+$", start=mark)              # written through fd 50
    assert resource.prlimit(w.pid, resource.RLIMIT_NOFILE) == (8, 8)
    assert 50 in procutil.fds(w.pid)
    procutil.assert_running_untraced(w.pid)
