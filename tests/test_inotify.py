"""inotify watches come back with the watch descriptors the program got, and report
files created after the restore; queued events that cannot be brought back are refused."""

import re
import signal

from checkpointing import dump_and_show
from pycrcmd import one_line_error, pycr

import procutil

INOTIFY_SCRIPT = r"""#!{python}
import ctypes, os, signal, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
st = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
def report(line):
    os.write(st, (line + "\n").encode())
top = sys.argv[2]
IN_CREATE, IN_DELETE, IN_ONESHOT, IN_IGNORED = 0x100, 0x200, 0x80000000, 0x8000
fd = libc.inotify_init1(os.O_NONBLOCK)
def add(path, mask):
    return libc.inotify_add_watch(fd, path.encode(), mask)
def events():
    out = []
    try:
        data = os.read(fd, 4096)
    except BlockingIOError:
        return out
    i = 0
    while i < len(data):
        wd, mask, cookie, n = struct.unpack_from("<iIII", data, i)
        name = data[i + 16:i + 16 + n].rstrip(b"\0").decode()
        out.append("%d:%x:%s" % (wd, mask, name))
        i += 16 + n
    return out
dirs = [os.path.join(top, "d%d" % i) for i in range(6)]
for d in dirs:
    os.mkdir(d)
wds = [add(d, IN_CREATE) for d in dirs]          # wds 1..6
for wd in wds[:5]:
    libc.inotify_rm_watch(fd, wd)                # the next wd is 7 all the same
events()                                         # the IN_IGNORED of those
late = add(dirs[0], IN_CREATE | IN_DELETE)       # 7
once = add(dirs[1], IN_CREATE | IN_ONESHOT)      # 8
report("wds %d %d %d" % (wds[5], late, once))
want = []
signal.signal(signal.SIGUSR1, lambda *a: want.append(1))
report("ready %d" % os.getpid())
while not want:
    time.sleep(0.01)
for d in (dirs[5], dirs[0], dirs[1], dirs[1]):
    open(os.path.join(d, "f%d" % len(os.listdir(d))), "w").close()
time.sleep(0.1)
report("events %s" % " ".join(events()))
report("new %d" % add(dirs[2], IN_CREATE))
while True:
    time.sleep(0.1)
"""


def test_inotify_watches_keep_their_wds(spawn, tmp_path, cleanup_pids):
    import sys
    script = tmp_path / "inotify.py"
    script.write_text(INOTIFY_SCRIPT.replace("{python}", sys.executable))
    script.chmod(0o755)
    top = tmp_path / "watched"
    top.mkdir()
    w = spawn(str(script), top)
    assert w.wait_for(r"^wds (.*)$").group(1) == "6 7 8"
    w.wait_for(r"^ready \d+$")
    dump_dir, shown = dump_and_show(w.pid, tmp_path, cleanup_pids, "inotify")
    assert f'"path": "{top}/d5"' in shown
    pycr("restore", "-D", dump_dir, "-d")
    got = w.signal_and_wait(signal.SIGUSR1, r"^events (.*)$").group(1)
    # Files created after the restore, reported with the program's own wds; the one-shot watch
    # fires once and is removed (IN_IGNORED); wds 1-5 stay free.
    assert got == "6:100:f0 7:100:f0 8:100:f0 8:8000:"
    assert w.wait_for(r"^new (\d+)$").group(1) == "9"


QUEUED_SCRIPT = r"""#!{python}
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
st = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
fd = libc.inotify_init1(0)
where = os.path.dirname(sys.argv[1])
libc.inotify_add_watch(fd, where.encode(), 0x100)
open(os.path.join(where, "made"), "w").close()       # an event the program has not read
os.write(st, ("fd %d\nready %d\n" % (fd, os.getpid())).encode())
while True:
    time.sleep(0.05)
"""


def test_queued_inotify_events_are_refused(spawn_python, tmp_path):
    w = spawn_python("inotify-queued", QUEUED_SCRIPT)
    fd = int(w.wait_for(r"^fd (\d+)$").group(1))
    proc = pycr("dump", "-t", w.pid, "-D", tmp_path / "img", expect=1)
    # One event for "made" at least (32 bytes with its padded name); the workload's own files may add more.
    assert re.fullmatch(rf"pycr: pid {w.pid} fd {fd}: inotify has (\d+) bytes of events not read yet",
                        one_line_error(proc))
    procutil.assert_running_untraced(w.pid)
