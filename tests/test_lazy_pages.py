"""Lazy restore (post-copy): `pycr lazy-pages` serves the anonymous memory of a tree that
`pycr restore --lazy-pages` starts without it.

Each test checks what the program itself sees: its memory's checksums after it touched every
page, bytes it wrote from a missing page with write(2), zeros where it dropped memory, and that a
daemon killed mid-serve takes the tree with it instead of leaving it to run on zero pages.
PYCR_LAZY_PUSH_DELAY holds the background push back where a test needs pages still missing.
"""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

import procutil
from pycrcmd import one_line_error, pycr
from workload_prelude import WORKLOAD_PRELUDE

SUMMARY = re.compile(r"lazy-pages: (\d+) pages placed \((\d+) on (\d+) faults, (\d+) pushed\), (\d+) zero, "
                     r"(\d+) dropped by the program, (\d+) forks")


def tree_script(a_mib, child_mib, parent_mib):
    """Two processes (the child forked before the dump) and a thread, with known content: a region of
    a_mib shared by fork, then child_mib in the child and parent_mib in the parent. SIGUSR1 makes
    each check its sums ("sum WHO ok|bad", the thread too); "count WHO N" every 5 steps."""
    return (WORKLOAD_PRELUDE + r"""import hashlib, mmap, random, threading
MB = 1 << 20
def region(size, seed):
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m[:] = random.Random(seed).randbytes(size)
    return m
def digest(m):
    return hashlib.sha256(m).hexdigest()
a = region(A_MIB * MB, 1)
want_a = digest(a)
child = os.fork()
who = "child" if child == 0 else "parent"
if child == 0:
    mine = region(CHILD_MIB * MB, 2)
    report("child ready %d" % os.getpid())
else:
    mine = region(PARENT_MIB * MB, 3)
want_mine = digest(mine)
asked = threading.Event()
def checker():
    while True:
        asked.wait()
        asked.clear()
        report("sum %s-thread %s" % (who, "ok" if digest(a) == want_a else "bad"))
threading.Thread(target=checker, daemon=True).start()
if child:
    report("ready %d" % os.getpid())
n = 0
while True:
    n += 1
    if n % 5 == 0:
        report("count %s %d" % (who, n))
    if go:
        go.pop()
        asked.set()
        report("sum %s %s" % (who, "ok" if digest(mine) == want_mine else "bad"))
    time.sleep(0.01)
""").replace("A_MIB", str(a_mib)).replace(
        "CHILD_MIB", str(child_mib)).replace("PARENT_MIB", str(parent_mib))


TREE_SCRIPT = tree_script(48, 48, 32)       # 176 MiB

# A kernel-mode fault (write(2) from a missing page), then a fork, madvise(DONTNEED) and munmap at
# SIGUSR1; at the next SIGUSR1 (once every page is placed) what it dropped must still read as zeros.
DROP_SCRIPT = WORKLOAD_PRELUDE + r"""import ctypes, hashlib, mmap, random
MB = 1 << 20
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
m = mmap.mmap(-1, 16 * MB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m[:] = random.Random(7).randbytes(16 * MB)
base = ctypes.addressof(ctypes.c_char.from_buffer(m))
PIPED, DROPPED, UNMAPPED = 4 * MB, 8 * MB, 12 * MB
want_piped = hashlib.sha256(m[PIPED:PIPED + 65536]).hexdigest()
want_rest = hashlib.sha256(m[:4 * MB]).hexdigest()
report("ready %d" % os.getpid())
wait_for_sigusr1()
r, w = os.pipe()
n = os.write(w, memoryview(m)[PIPED:PIPED + 65536])      # the kernel reads the missing pages
got = b""
while len(got) < n:
    got += os.read(r, 65536)
report("piped %d %s" % (n, "ok" if hashlib.sha256(got).hexdigest() == want_piped else "bad"))
pid = os.fork()
if pid == 0:                                              # its pages are missing too: served to it
    report("forked %s" % ("ok" if hashlib.sha256(m[:4 * MB]).hexdigest() == want_rest else "bad"))
    os._exit(0)
os.waitpid(pid, 0)
m.madvise(mmap.MADV_DONTNEED, DROPPED, MB)
libc.munmap(base + UNMAPPED, MB)
fresh = libc.mmap(base + UNMAPPED, MB, mmap.PROT_READ | mmap.PROT_WRITE,
                  mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x10, -1, 0)          # MAP_FIXED
report("dropped %s" % (fresh == base + UNMAPPED))
wait_for_sigusr1()
zero = bytes(MB)
report("zeros %s %s rest %s" % (m[DROPPED:DROPPED + MB] == zero, ctypes.string_at(base + UNMAPPED, MB) == zero,
                                 "ok" if hashlib.sha256(m[:4 * MB]).hexdigest() == want_rest else "bad"))
while True:
    time.sleep(0.1)
"""

# Touches one page per millisecond and checks each: a page it got as zeros is reported at once.
SLOW_SCRIPT = WORKLOAD_PRELUDE + r"""import mmap, struct
PAGES = 16384
m = mmap.mmap(-1, PAGES * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(PAGES):
    m[i * 4096:i * 4096 + 8] = struct.pack("<Q", i + 1)
report("ready %d" % os.getpid())
i = 0
while True:
    if struct.unpack("<Q", m[i * 4096:i * 4096 + 8])[0] != i + 1:
        report("bad page %d" % i)
    i += 1
    if i % 100 == 0:
        report("touched %d" % i)
    if i == PAGES:
        i = 0
    time.sleep(0.001)
"""


@pytest.fixture
def daemon(tmp_path):
    """daemon(imgdir, push_delay=None) -> Popen of `pycr lazy-pages -D imgdir`, listening; killed at teardown."""
    started = []

    def start(imgdir, push_delay=None):
        env = dict(os.environ)
        if push_delay is not None:
            env["PYCR_LAZY_PUSH_DELAY"] = str(push_delay)
        p = subprocess.Popen([sys.executable, "-m", "pycr", "lazy-pages", "-D", str(imgdir)], env=env,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(p)
        sock = os.path.join(imgdir, "lazy-pages.sock")
        line = p.stdout.readline()          # one line once it listens, as page-server and serve say it
        assert line == f"pycr lazy-pages: listening on {sock}\n", line + (p.stderr.read() if p.poll() else "")
        assert os.path.exists(sock) and p.poll() is None
        return p

    yield start
    for p in started:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=30)


def finished(p, timeout=60):
    """The daemon's exit status and summary numbers once it is done."""
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"lazy-pages exited {p.returncode}\n{out}\n{err}"
    m = SUMMARY.search(out)
    assert m, out
    placed, on_fault, faults, pushed, zero, dropped, forks = map(int, m.groups())
    assert placed == on_fault + pushed
    return dict(placed=placed, on_fault=on_fault, faults=faults, pushed=pushed, zero=zero, dropped=dropped,
                forks=forks)


def test_a_tree_restored_lazily_runs_on_with_all_its_memory(spawn_python, tmp_path, cleanup_pids, daemon):
    w = spawn_python("lazytree", TREE_SCRIPT)
    child = int(w.wait_for(r"^child ready (\d+)$").group(1))
    w.wait_for(r"^count parent 10$")
    pids = w.pids()
    assert sorted(pids) == sorted([w.pid, child])
    img = tmp_path / "img"
    pycr("dump", "-t", w.pid, "-D", img)
    last = int(w.last("count parent").split()[-1])
    d = daemon(img)
    mark = w.mark()
    cleanup_pids.add(*pids)
    pycr("restore", "-D", img, "-d", "--lazy-pages")
    for pid in pids:                    # check every page at once, while the push goes on
        os.kill(pid, signal.SIGUSR1)
    for who in ("parent", "child", "parent-thread"):
        w.wait_for(rf"^sum {who} (ok|bad)$", timeout=60, start=mark)
    assert not [line for line in w.lines(mark) if line.endswith("bad")], w.lines(mark)
    w.wait_for(rf"^count parent {last + 20}$", start=mark)
    w.wait_for(r"^count child \d+$", start=mark)
    assert len(w.threads()) == 2
    got = finished(d)
    # Pages come on fault (the interpreter runs at once) and by the push, each once.
    assert got["faults"] > 0 and got["on_fault"] > 0
    assert got["placed"] * 4096 >= 176 << 20
    procutil.assert_running_untraced(w.pid)


def test_kernel_reads_forks_and_dropped_memory(spawn_python, tmp_path, cleanup_pids, daemon):
    w = spawn_python("lazydrop", DROP_SCRIPT)
    img = tmp_path / "img"
    pycr("dump", "-t", w.pid, "-D", img)
    d = daemon(img, push_delay=4)       # nothing is pushed for 4 s after the tree starts
    mark = w.mark()
    cleanup_pids.add(w.pid)
    pycr("restore", "-D", img, "-d", "--lazy-pages")
    started = time.monotonic()
    w.signal(signal.SIGUSR1)
    w.wait_for(r"^dropped True$", start=mark)
    # Everything above ran while nothing was pushed: each page came through a fault.
    assert time.monotonic() - started < 4, "too slow to have faulted the pages itself"
    # write(2) read the missing pages in the kernel: served, not EFAULT.
    assert w.fields("piped", mark) == [["65536", "ok"]]
    # A child forked after the restore got its missing pages from its own userfaultfd.
    assert w.fields("forked", mark) == [["ok"]]
    got = finished(d)
    assert got["forks"] == 1
    assert got["dropped"] >= 2 * 256            # 1 MiB dropped + 1 MiB unmapped, never filled
    w.signal(signal.SIGUSR1)
    assert w.wait_for(r"^zeros (\S+) (\S+) rest (\S+)$", start=mark).groups() == ("True", "True", "ok")


def test_killing_the_daemon_kills_the_tree(spawn_python, tmp_path, cleanup_pids, daemon):
    w = spawn_python("lazyslow", SLOW_SCRIPT)
    img = tmp_path / "img"
    pycr("dump", "-t", w.pid, "-D", img)
    d = daemon(img, push_delay=600)
    mark = w.mark()
    cleanup_pids.add(w.pid)
    pycr("restore", "-D", img, "-d", "--lazy-pages")
    w.wait_for(r"^touched 300$", start=mark)        # running, most of its pages still missing
    d.kill()
    d.wait(timeout=10)
    # The watchdog kills it: it must not go on with zero pages where its memory was.
    assert procutil.wait_until(lambda: not w.alive(), 10), "the restored tree outlived its page server"
    assert not [line for line in w.lines(mark) if line.startswith("bad")]


def test_restore_without_a_daemon_fails_before_any_task(spawn_python, tmp_path, cleanup_pids):
    w = spawn_python("lazynone", SLOW_SCRIPT)
    img = tmp_path / "img"
    pycr("dump", "-t", w.pid, "-D", img)
    cleanup_pids.add(w.pid)
    p = pycr("restore", "-D", img, "-d", "--lazy-pages", expect=1)
    assert "no lazy-pages daemon" in one_line_error(p)
    assert not procutil.exists(w.pid)


def test_check_serves_a_fault():
    import json
    doc = json.loads(pycr("check", "--json").stdout)
    found = {c["name"]: c for c in doc["checks"]}["userfaultfd MISSING"]
    assert found["ok"] and "kernel-mode fault served" in found["detail"], found


def test_daemon_mode_reports_its_pid_and_status_fd_gets_a_nul(spawn_python, tmp_path, cleanup_pids):
    """--daemon returns once listening, naming the daemon's PID (criu's --daemon, as page-server takes it);
    --status-fd gets one NUL byte then; the daemon in the background serves the restore and exits."""
    w = spawn_python("lazybg", SLOW_SCRIPT)
    w.wait_for(r"^touched 100$")
    img = tmp_path / "img"
    pycr("dump", "-t", w.pid, "-D", img)
    cleanup_pids.add(w.pid)
    r, wfd = os.pipe()
    try:
        started = subprocess.run([sys.executable, "-m", "pycr", "lazy-pages", "-D", str(img), "--daemon",
                                  "--status-fd", str(wfd)], stdin=subprocess.DEVNULL, capture_output=True,
                                 text=True, timeout=30, pass_fds=(wfd,))
        os.close(wfd)
        wfd = -1
        assert started.returncode == 0, started.stderr
        sock = os.path.join(img, "lazy-pages.sock")
        m = re.fullmatch(rf"pycr lazy-pages: listening on {re.escape(sock)} \(pid (\d+)\)", started.stdout.strip())
        assert m, started.stdout
        daemon = int(m.group(1))
        cleanup_pids.add(daemon)
        assert os.read(r, 16) == b"\0"
    finally:
        os.close(r)
        if wfd >= 0:
            os.close(wfd)
    assert procutil.exists(daemon) and os.path.exists(sock)
    mark = w.mark()
    pycr("restore", "-D", img, "-d", "--lazy-pages")
    assert procutil.wait_until(lambda: len(w.fields("touched", mark)) >= 3, 30), w.lines(mark)
    # every page placed: the daemon exits (reparented, so it may stay a zombie until reaped)
    assert procutil.wait_until(lambda: not procutil.exists(daemon) or procutil.is_zombie(daemon), 60)
    assert not [line for line in w.lines(mark) if line.startswith("bad")]
    procutil.assert_running_untraced(w.pid)


def test_daemon_mode_failing_before_it_listens_exits_with_its_error(tmp_path):
    """--daemon: a daemon that cannot start (no image set) fails in the foreground, exit 1 and one line."""
    p = pycr("lazy-pages", "-D", tmp_path / "missing", "--daemon", expect=1)
    assert p.stdout == "", p.stdout
    assert one_line_error(p).startswith("pycr: ")


def test_a_deep_images_dir_still_takes_the_daemons_socket(spawn_python, tmp_path, cleanup_pids, daemon):
    """A socket path longer than sun_path's 108 bytes (a deep work directory): the daemon binds and the
    restore connects through their directory's fd, and the tree runs on with its pages."""
    w = spawn_python("lazydeep", SLOW_SCRIPT)
    w.wait_for(r"^touched 100$")
    img = tmp_path.joinpath(*["a-directory-name-of-some-length"] * 4, "img")
    assert len(os.fsencode(str(img / "lazy-pages.sock"))) > 108
    pycr("dump", "-t", w.pid, "-D", img)
    d = daemon(img)
    mark = w.mark()
    cleanup_pids.add(w.pid)
    pycr("restore", "-D", img, "-d", "--lazy-pages")
    assert procutil.wait_until(lambda: len(w.fields("touched", mark)) >= 3, 30), w.lines(mark)
    got = finished(d)
    assert got["placed"] * 4096 >= 16384 * 4096
    assert not [line for line in w.lines(mark) if line.startswith("bad")]
    procutil.assert_running_untraced(w.pid)
