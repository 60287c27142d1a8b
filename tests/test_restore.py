"""pycr restore against real processes: dump a workload, bring it back, check what a user would.

Every restored tree keeps the dumped PIDs, so the Workload object (and its
teardown, which kills by PID and session) keeps working for it; the PIDs are
also registered with cleanup_pids in case a restore half-succeeds.
"""

import os
import signal
import threading
import time

import pytest

import procutil
from pycrcmd import one_line_error, pycr


def stub_tasks():
    """PIDs of every live restore stub (none may be left after a failed restore)."""
    from pycr.native import core
    stub = core.stub_path()
    out = []
    for pid in procutil.all_pids():
        try:
            if os.readlink(f"/proc/{pid}/exe") == stub:
                out.append(pid)
        except OSError:
            pass
    return out


def dump(w, imgdir, *extra):
    pycr("dump", "-t", w.pid, "-D", imgdir, *extra)


def restore(imgdir, cleanup_pids, pids, *extra, expect=0):
    cleanup_pids.add(*pids)
    return pycr("restore", "-D", imgdir, "-d", *extra, expect=expect)


def counts_after(w, prefix, start):
    return [int(f[-1]) for f in w.fields(prefix, start)]


def test_counter_continues(spawn, tmp_path, cleanup_pids):
    w = spawn("counter")
    w.wait_for(r"^count 5$")
    dump(w, tmp_path / "img")
    n = int(w.last("count").split()[1])
    mark = w.mark()
    assert not procutil.exists(w.pid)
    restore(tmp_path / "img", cleanup_pids, [w.pid])
    w.wait_for(rf"^count {n + 5}$", start=mark)
    after = counts_after(w, "count", mark)
    # It goes on from the dumped value, one step at a time, never from 0.
    assert after[0] in (n, n + 1)
    assert after == list(range(after[0], after[0] + len(after)))
    procutil.assert_running_untraced(w.pid)
    assert procutil.stat(w.pid)["comm"] == "counter"
    assert os.readlink(f"/proc/{w.pid}/exe") == w.argv[0]
    # Its SIGUSR1 handler is still installed and runs on the restored stack.
    w.signal_and_wait(signal.SIGUSR1, r"^usr1 \d+$")
    # Nothing of pycr is left in it: no stub mapping, no extra fd.
    assert not any("pycr" in path for _, _, _, path in procutil.maps(w.pid))
    assert sorted(procutil.fds(w.pid)) == [0, 1, 2, 3]


def test_tree_ids(spawn, tmp_path, cleanup_pids):
    w = spawn("tree")
    pids = w.pids()
    assert len(pids) == 4
    ids = {p: (procutil.ppid(p), procutil.pgid(p), procutil.sid(p)) for p in pids}
    dump(w, tmp_path / "img")
    mark = w.mark()
    restore(tmp_path / "img", cleanup_pids, pids)
    # Same PIDs, parents, groups and session; the root's parent is whoever ran pycr.
    got = {p: (procutil.ppid(p), procutil.pgid(p), procutil.sid(p)) for p in pids}
    for p in pids:
        if p == w.pid:
            assert got[p][1:] == ids[p][1:]
        else:
            assert got[p] == ids[p], f"pid {p}"
    assert sorted(w.pids()) == sorted(pids)
    for p in pids:
        start = len(counts_after(w, f"count {p}", mark))
        w.wait_for(rf"^count {p} \d+$", start=mark + start)
    procutil.assert_running_untraced(*pids)
    for p in pids:
        got_counts = counts_after(w, f"count {p}", mark)
        assert got_counts[0] > 1, "the counter started over"


def test_threads_all_run(spawn, tmp_path, cleanup_pids):
    w = spawn("threads")
    tids = w.threads()
    assert len(tids) == 4
    dump(w, tmp_path / "img")
    mark = w.mark()
    restore(tmp_path / "img", cleanup_pids, [w.pid])
    assert w.threads() == tids
    procutil.assert_running_untraced(w.pid)
    for tid in tids:
        # Each thread counts on: two fresh reports of its own counter.
        w.wait_for(rf"^count {tid} \d+$", start=mark)
        first = counts_after(w, f"count {tid}", mark)[0]
        w.wait_for(rf"^count {tid} {first + 2}$", start=mark)
        assert first > 1


def test_threads_join_names_and_altstack(spawn, tmp_path, cleanup_pids):
    """Per-thread kernel links survive: pthread_join wakes (clear_child_tid), the
    threads keep their names, and a signal still runs on the alternate stack."""
    w = spawn("joiner")
    tids = w.threads()
    names = procutil.thread_names(w.pid)
    assert sorted(names.values()) == ["joiner", "worker-0", "worker-1", "worker-2"]
    dump(w, tmp_path / "img")
    mark = w.mark()
    restore(tmp_path / "img", cleanup_pids, [w.pid])
    assert w.threads() == tids
    assert procutil.thread_names(w.pid) == names
    w.signal_and_wait(signal.SIGUSR2, r"^altstack 1$")
    w.signal_and_wait(signal.SIGUSR1, r"^joined 3$")
    assert w.threads() == [w.pid]
    assert len(w.fields("count", mark)) > 0


@pytest.mark.time_limit(300)
def test_bigmem_checksum(spawn, tmp_path, cleanup_pids):
    w = spawn("bigmem", 256)
    before = w.signal_and_wait(signal.SIGUSR1, r"^sum ([0-9a-f]+)$", timeout=60).group(1)
    dump(w, tmp_path / "img")
    restore(tmp_path / "img", cleanup_pids, [w.pid])
    after = w.signal_and_wait(signal.SIGUSR1, r"^sum ([0-9a-f]+)$", timeout=60)
    assert after.group(1) == before


def test_file_offset(spawn, tmp_path, cleanup_pids):
    data = tmp_path / "data"
    w = spawn("openfile", data, 20000)
    offset = w.signal_and_wait(signal.SIGUSR1, r"^offset (\d+)$").group(1)
    assert offset == "20000"
    dump(w, tmp_path / "img")
    restore(tmp_path / "img", cleanup_pids, [w.pid])
    assert w.signal_and_wait(signal.SIGUSR1, r"^offset (\d+)$").group(1) == offset
    # Reading goes on from there: the bytes of the file at 20000.
    got = w.signal_and_wait(signal.SIGUSR2, r"^read ([0-9a-f]+)$").group(1)
    assert got == bytes((i * 31 + 7) & 0xFF for i in range(20000, 20016)).hex()


def test_pipe_data(spawn, tmp_path, cleanup_pids):
    w = spawn("pipe")
    child = int(w.wait_for(r"^child (\d+)$").group(1))
    dump(w, tmp_path / "img")
    restore(tmp_path / "img", cleanup_pids, [w.pid, child])
    assert procutil.ppid(child) == w.pid
    got = w.signal_and_wait(signal.SIGUSR1, r"^got ([0-9a-f]+)$", pid=child).group(1)
    assert bytes.fromhex(got) == b"pycr pipe message 0123456789"
    # Both ends are one pipe object again: the parent's write end and the child's read
    # end have one inode, and what goes in at one comes out at the other.
    ends = lambda pid: {fd: t for fd, t in procutil.fds(pid).items() if t.startswith("pipe:")}
    (wfd, wlink), = ends(w.pid).items()
    (rfd, rlink), = ends(child).items()
    assert wlink == rlink
    assert os.stat(f"/proc/{w.pid}/fd/{wfd}").st_ino == os.stat(f"/proc/{child}/fd/{rfd}").st_ino
    writer = os.open(f"/proc/{w.pid}/fd/{wfd}", os.O_WRONLY | os.O_CLOEXEC)
    reader = os.open(f"/proc/{child}/fd/{rfd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        assert os.write(writer, b"through the restored pipe") == 25
        assert os.read(reader, 100) == b"through the restored pipe"
    finally:
        os.close(writer)
        os.close(reader)


def test_seccomp_still_applies(spawn, tmp_path, cleanup_pids):
    w = spawn("seccomp")
    w.signal_and_wait(signal.SIGUSR1, r"^filtered2 errno 43$")
    dump(w, tmp_path / "img")
    mark = w.mark()
    restore(tmp_path / "img", cleanup_pids, [w.pid])
    w.signal_and_wait(signal.SIGUSR1, r"^filtered2 errno 43$")
    assert w.wait_for(r"^filtered errno (\d+)$", start=mark).group(1) == "42"
    assert procutil.status(w.pid)["Seccomp"] == "2"


def test_restore_dump_restore_twice(spawn, tmp_path, cleanup_pids):
    w = spawn("tree")
    pids = w.pids()
    dump(w, tmp_path / "img0")
    for i in (1, 2):
        restore(tmp_path / f"img{i - 1}", cleanup_pids, pids)
        mark = w.mark()
        w.wait_for(rf"^count {pids[-1]} \d+$", start=mark)
        dump(w, tmp_path / f"img{i}")
    restore(tmp_path / "img2", cleanup_pids, pids)
    mark = w.mark()
    for p in pids:
        w.wait_for(rf"^count {p} \d+$", start=mark)
    procutil.assert_running_untraced(*pids)


def _ns_twin(pid, exe):
    """The outer PID of a process that is `pid` inside a child PID namespace."""
    for outer in procutil.all_pids():
        st = procutil.status(outer)
        if not st or "NSpid" not in st:
            continue
        ns = st["NSpid"].split()
        if len(ns) == 2 and int(ns[1]) == pid:
            try:
                if os.readlink(f"/proc/{outer}/exe") == exe:
                    return outer
            except OSError:
                pass
    return None


def test_pidns_while_original_runs(spawn, tmp_path, cleanup_pids):
    w = spawn("counter")
    w.wait_for(r"^count 3$")
    dump(w, tmp_path / "img", "-R")
    # The original keeps its PID; stop it so that only the twin writes the status file.
    w.signal(signal.SIGSTOP)
    try:
        n = int(w.last("count").split()[1])
        mark = w.mark()
        proc = pycr("restore", "-D", tmp_path / "img", "-d", "--pidns")
        twin = _ns_twin(w.pid, w.argv[0])
        assert twin is not None, proc.stderr
        init = procutil.ppid(twin)
        cleanup_pids.add(init, twin)
        assert procutil.status(twin)["NSpid"].split()[1] == str(w.pid)
        assert procutil.status(init)["NSpid"].split()[1] == "1"
        w.wait_for(rf"^count {n + 3}$", start=mark)
        assert procutil.state(w.pid) == "T"
    finally:
        w.signal(signal.SIGCONT)


def test_wait_returns_exit_status(spawn, tmp_path):
    w = spawn("counter")
    dump(w, tmp_path / "img")
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-m", "pycr", "restore", "-D", str(tmp_path / "img")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        mark = w.mark()
        procutil.wait_until(lambda: len(w.lines(mark)) >= 2 or proc.poll() is not None, 30)
        assert w.fields("count", mark), proc.poll()
        w.signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_pidns_wait_returns_status_and_ends_the_namespace(spawn, tmp_path, cleanup_pids):
    """Without -d, --pidns reports the root's status, and the namespace's init stub
    goes once nothing is left in it: no stub outlives the restored tree."""
    import subprocess
    import sys
    w = spawn("counter")
    dump(w, tmp_path / "img", "-R")
    w.signal(signal.SIGSTOP)          # the original keeps its PID and stays quiet
    proc = subprocess.Popen([sys.executable, "-m", "pycr", "restore", "-D", str(tmp_path / "img"), "--pidns"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        procutil.wait_until(lambda: _ns_twin(w.pid, w.argv[0]) or proc.poll() is not None, 30)
        twin = _ns_twin(w.pid, w.argv[0])
        assert twin is not None, proc.poll()
        init = procutil.ppid(twin)
        cleanup_pids.add(init, twin)
        procutil.kill(twin, signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        assert procutil.wait_gone([init], timeout=5) == []
    finally:
        w.signal(signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


ORPHANING_SCRIPT = """#!{python}
import os, signal, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
def report(line):
    os.write(fd, (line + "\\n").encode())
want = []
signal.signal(signal.SIGUSR1, lambda *a: want.append(1))
signal.signal(signal.SIGUSR2, lambda *a: os._exit(7))
report("ready %d" % os.getpid())
n = 0
while True:
    n += 1
    report("count %d" % n)
    if want:
        want.clear()
        middle = os.fork()
        if middle == 0:
            if os.fork() == 0:
                while os.getppid() != 1:
                    time.sleep(0.001)        # until the middle process is gone: orphaned
                report("orphan %d %d" % (os.getpid(), os.getppid()))
                os._exit(0)
            os._exit(0)
        os.waitpid(middle, 0)
        report("middle %d reaped" % middle)
    time.sleep(0.01)
"""


def _restore_pidns_waiting(w, imgdir):
    """`pycr restore --pidns` without -d, as a user runs it -> (Popen, twin, init) once the
    restored root reports again."""
    import subprocess
    import sys
    mark = w.mark()
    proc = subprocess.Popen([sys.executable, "-m", "pycr", "restore", "-D", str(imgdir), "--pidns"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        w.wait_for(r"^count \d+$", start=mark, timeout=30)
    except AssertionError:
        proc.kill()
        raise AssertionError(f"no report from the restored tree: {proc.communicate()[1]}") from None
    twin = _ns_twin(w.pid, os.readlink(f"/proc/{os.getpid()}/exe"))
    assert twin is not None
    return proc, twin, procutil.ppid(twin)


def _zombies_under(pid):
    return [p for p in procutil.descendants(pid) if procutil.state(p) == "Z"]


def test_pidns_restore_reaps_orphans_while_pycr_waits(spawn_python, tmp_path, cleanup_pids):
    """While `pycr restore --pidns` waits for the root, the namespace's init runs
    (untraced): a process orphaned in the namespace is reaped, no zombie stays."""
    w = spawn_python("orphaning", ORPHANING_SCRIPT)
    dump(w, tmp_path / "img", "-R")
    w.signal(signal.SIGSTOP)          # the original keeps its PID and stays quiet
    proc, twin, init = _restore_pidns_waiting(w, tmp_path / "img")
    cleanup_pids.add(init, twin)
    try:
        procutil.assert_running_untraced(init, twin)
        orphan = int(w.signal_and_wait(signal.SIGUSR1, r"^orphan (\d+) 1$", pid=twin).group(1))
        assert orphan != w.pid
        procutil.wait_until(lambda: not _zombies_under(init), 5)
        assert _zombies_under(init) == [], "an orphan in the namespace stays a zombie"
        assert proc.poll() is None          # still waiting for the root
        procutil.kill(twin, signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        w.signal(signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_pidns_tree_outlives_a_killed_waiting_pycr(spawn, tmp_path, cleanup_pids):
    """SIGKILL of `pycr restore --pidns` while it waits for the root: the restored
    tree and its namespace run on, untraced."""
    w = spawn("counter")
    dump(w, tmp_path / "img", "-R")
    w.signal(signal.SIGSTOP)
    mark = w.mark()
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-m", "pycr", "restore", "-D", str(tmp_path / "img"), "--pidns"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        w.wait_for(r"^count \d+$", start=mark, timeout=30)
        twin = _ns_twin(w.pid, w.argv[0])
        assert twin is not None
        init = procutil.ppid(twin)
        cleanup_pids.add(init, twin)
        proc.kill()
        assert proc.wait(timeout=10) == -signal.SIGKILL
        n = int(w.last("count").split()[1])
        w.wait_for(rf"^count {n + 5}$", start=mark)
        procutil.assert_running_untraced(init, twin)
        assert procutil.status(twin)["NSpid"].split()[1] == str(w.pid)
    finally:
        w.signal(signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_pidns_wait_returns_the_exit_code(spawn_python, tmp_path, cleanup_pids):
    """The root's own exit code comes out of `pycr restore --pidns` (the init stub
    keeps it for pycr, which never traces init while it waits); the namespace ends."""
    w = spawn_python("orphaning", ORPHANING_SCRIPT)
    dump(w, tmp_path / "img", "-R")
    w.signal(signal.SIGSTOP)
    proc, twin, init = _restore_pidns_waiting(w, tmp_path / "img")
    cleanup_pids.add(init, twin)
    try:
        procutil.kill(twin, signal.SIGUSR2)            # _exit(7)
        assert proc.wait(timeout=30) == 7, proc.stderr.read()
        assert procutil.wait_gone([init], timeout=5) == []
    finally:
        w.signal(signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- failures

def _fails(imgdir, cleanup_pids, pids, *extra):
    before = stub_tasks()
    proc = restore(imgdir, cleanup_pids, pids, *extra, expect=1)
    line = one_line_error(proc)
    assert stub_tasks() == before
    return line


def test_missing_image(spawn, tmp_path, cleanup_pids):
    w = spawn("counter")
    dump(w, tmp_path / "img")
    os.unlink(tmp_path / "img" / f"core-{w.pid}.img")
    line = _fails(tmp_path / "img", cleanup_pids, [w.pid])
    assert f"core-{w.pid}.img" in line and "missing" in line
    assert not procutil.exists(w.pid)


def test_truncated_pages(spawn, tmp_path, cleanup_pids):
    w = spawn("counter")
    dump(w, tmp_path / "img")
    pages = tmp_path / "img" / f"pages-{w.pid}.img"
    os.truncate(pages, os.path.getsize(pages) - 4096)
    line = _fails(tmp_path / "img", cleanup_pids, [w.pid])
    assert "truncated" in line and pages.name in line
    assert not procutil.exists(w.pid)


def test_corrupt_image(spawn, tmp_path, cleanup_pids):
    w = spawn("counter")
    dump(w, tmp_path / "img")
    mm = tmp_path / "img" / f"mm-{w.pid}.img"
    data = bytearray(mm.read_bytes())
    mm.write_bytes(bytes(data[:len(data) // 2]))
    line = _fails(tmp_path / "img", cleanup_pids, [w.pid])
    assert mm.name in line
    assert not procutil.exists(w.pid)


def test_pid_taken(spawn, tmp_path, cleanup_pids):
    w = spawn("counter")
    dump(w, tmp_path / "img", "-R")
    before = stub_tasks()
    proc = pycr("restore", "-D", tmp_path / "img", "-d", expect=1)
    line = one_line_error(proc)
    # held by the dumped tree itself (-R): said, so that --pidns is not taken for the cure
    assert line == f"pycr: pid {w.pid} is in use by a counter, as in the images: is this tree running " \
                   "already? (--pidns would run a second copy); restore with --pidns"
    assert stub_tasks() == before
    procutil.assert_running_untraced(w.pid)


def test_missing_file(spawn, tmp_path, cleanup_pids):
    data = tmp_path / "data"
    w = spawn("openfile", data)
    w.wait_for(r"^fd \d+$")
    dump(w, tmp_path / "img")
    os.unlink(data)
    line = _fails(tmp_path / "img", cleanup_pids, [w.pid])
    assert str(data) in line and "no longer exists" in line
    assert not procutil.exists(w.pid)


def test_failure_mid_restore_kills_tree(spawn, tmp_path, cleanup_pids):
    """A child whose mapping cannot be made fails after the whole stub tree exists."""
    from pycr import manifest
    from pycr.images import ImageDir
    w = spawn("tree")
    pids = w.pids()
    dump(w, tmp_path / "img")
    img = ImageDir(tmp_path / "img")
    last = img.read("pstree").processes[-1].pid
    mm = img.read("mm", last)
    for vma in mm.vmas:
        if str(vma.kind) == "file":
            vma.path = str(tmp_path)       # a directory: open works, mmap does not
            break
    img.write("mm", mm, last)
    manifest.reseal(tmp_path / "img")     # an edit on purpose, not a corruption
    line = _fails(tmp_path / "img", cleanup_pids, pids)
    assert f"pid {last}" in line
    assert [p for p in pids if procutil.exists(p)] == []


def _same_description(pid1, fd1, pid2, fd2):
    """kcmp(KCMP_FILE): do the two fds share one open file description?"""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    res = libc.syscall(ctypes.c_long(312), ctypes.c_long(pid1), ctypes.c_long(pid2), ctypes.c_long(0),
                       ctypes.c_long(fd1), ctypes.c_long(fd2))
    assert res >= 0, os.strerror(ctypes.get_errno())
    return res == 0


def test_shared_descriptions_stay_shared(spawn, tmp_path, cleanup_pids):
    w = spawn("tree")
    pids = w.pids()
    # stdout is one description inherited by fork; the status fds are one per process.
    assert _same_description(pids[0], 1, pids[1], 1)
    assert _same_description(pids[0], 1, pids[0], 2)
    dump(w, tmp_path / "img")
    restore(tmp_path / "img", cleanup_pids, pids)
    for p in pids[1:]:
        assert _same_description(pids[0], 1, p, 1)
        assert _same_description(p, 1, p, 2)
    status_fds = {p: [fd for fd, t in procutil.fds(p).items() if t == w.status_path] for p in pids}
    assert all(len(v) == 1 for v in status_fds.values())
    assert not _same_description(pids[0], status_fds[pids[0]][0], pids[1], status_fds[pids[1]][0])


def test_mapper_layout_and_contents(spawn, tmp_path, cleanup_pids):
    """An address space reshaped by mmap/munmap/mremap/mprotect comes back byte for byte."""
    w = spawn("mapper", 5)
    w.wait_for(r"^step 60$")
    w.signal_and_wait(signal.SIGUSR2, r"^paused \d+$")
    regions = w.signal_and_wait(signal.SIGUSR1, r"^regions (.*)$").group(1)
    before = w.wait_for(r"^sum ([0-9a-f]+)$", start=w.mark() - 1).group(1)
    maps_before = procutil.coalesced_maps(w.pid)
    dump(w, tmp_path / "img")
    restore(tmp_path / "img", cleanup_pids, [w.pid])
    # The same address ranges with the same protections and backing (the kernel may
    # merge neighbours that were separate VMAs before, e.g. after an mremap).
    assert procutil.coalesced_maps(w.pid) == maps_before
    mark = w.mark()
    assert w.signal_and_wait(signal.SIGUSR1, r"^regions (.*)$").group(1) == regions
    assert w.wait_for(r"^sum ([0-9a-f]+)$", start=mark).group(1) == before
    # And it goes on reshaping itself.
    step = int(w.last("paused").split()[1])
    w.signal_and_wait(signal.SIGUSR2, r"^resumed \d+$")
    w.wait_for(rf"^step {step + 20}$", start=mark)


def test_forker_goes_on_forking_and_reaping(spawn, tmp_path, cleanup_pids):
    w = spawn("forker")
    w.wait_for(r"^exit \d+ 0$")
    w.wait_for(r"^fork \d+$", start=w.mark())
    dump(w, tmp_path / "img")
    from pycr.images import ImageDir
    pids = [p.pid for p in ImageDir(tmp_path / "img").read("pstree").processes]
    assert len(pids) >= 2
    mark = w.mark()
    restore(tmp_path / "img", cleanup_pids, pids)
    # The workers restored with it are still its children: it reaps them, status 0.
    for p in pids[1:]:
        w.wait_for(rf"^exit {p} 0$", start=mark)
    # New workers come and go.
    new = int(w.wait_for(r"^fork (\d+)$", start=mark).group(1))
    w.wait_for(rf"^exit {new} 0$", start=mark)


SHARED_ANON_SCRIPT = """#!{python}
import mmap, os, struct, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
def report(line):
    os.write(fd, (line + "\\n").encode())
shared = mmap.mmap(-1, 3 * 4096, flags=mmap.MAP_SHARED)
shared[4096:4096 + 5] = b"hello"
child = os.fork()
if child == 0:
    n = 0
    while True:
        n += 1
        shared[0:8] = struct.pack("<Q", n)
        time.sleep(0.01)
report("child %d" % child)
report("ready %d" % os.getpid())
while True:
    report("seen %d %s" % (struct.unpack("<Q", shared[0:8])[0], bytes(shared[4096:4096 + 5]).decode()))
    time.sleep(0.02)
"""


def test_shared_anonymous_memory(spawn_python, tmp_path, cleanup_pids):
    """A MAP_SHARED|MAP_ANONYMOUS region stays one object shared by parent and child."""
    w = spawn_python("shared_anon", SHARED_ANON_SCRIPT)
    child = int(w.wait_for(r"^child (\d+)$").group(1))
    w.wait_for(r"^seen [1-9]\d* hello$")
    dump(w, tmp_path / "img")
    last = int(w.last("seen").split()[1])
    mark = w.mark()
    restore(tmp_path / "img", cleanup_pids, [w.pid, child])
    # The parent sees the child's writes go on from where they were: same object.
    procutil.wait_until(lambda: [f for f in w.fields("seen", mark) if int(f[0]) >= last + 20])
    seen = [int(f[0]) for f in w.fields("seen", mark)]
    assert seen and seen[0] >= last and seen[-1] >= last + 20, seen[-5:]
    assert all(f[1] == "hello" for f in w.fields("seen", mark))
    shared = lambda pid: {(s, e): path for s, e, p, path in procutil.maps(pid) if p[3] == "s"}
    assert shared(w.pid) and shared(w.pid) == shared(child)


PENDING_SCRIPT = """#!{python}
import os, signal, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
def report(line):
    os.write(fd, (line + "\\n").encode())
signal.signal(signal.SIGUSR1, lambda *a: report("usr1"))
signal.signal(signal.SIGUSR2, lambda *a: signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR1]))
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
report("ready %d" % os.getpid())
while True:
    report("tick")
    time.sleep(0.02)
"""


def test_blocked_mask_and_pending_signal(spawn_python, tmp_path, cleanup_pids):
    """A blocked SIGUSR1 stays blocked and pending; unblocked after restore, its handler runs."""
    w = spawn_python("pending", PENDING_SCRIPT)
    usr1 = 1 << (signal.SIGUSR1 - 1)
    w.signal(signal.SIGUSR1)
    procutil.wait_until(lambda: signal.SIGUSR1 in procutil.pending_signals(w.pid), 5)
    assert int(procutil.status(w.pid)["SigBlk"], 16) & usr1
    dump(w, tmp_path / "img")
    mark = w.mark()
    restore(tmp_path / "img", cleanup_pids, [w.pid])
    w.wait_for(r"^tick$", start=mark)
    st = procutil.status(w.pid)
    assert int(st["SigBlk"], 16) & usr1 and int(st["ShdPnd"], 16) & usr1
    assert "usr1" not in w.lines(mark)
    w.signal(signal.SIGUSR2)
    w.wait_for(r"^usr1$", start=mark)


def test_restored_process_can_exec(spawn, tmp_path, cleanup_pids):
    w = spawn("execer", 0)
    w.wait_for(r"^count 5$")
    dump(w, tmp_path / "img")
    mark = w.mark()
    restore(tmp_path / "img", cleanup_pids, [w.pid])
    w.wait_for(r"^count \d+$", start=mark)
    w.signal(signal.SIGUSR2)
    w.wait_for(rf"^exec {w.pid}$", start=mark)
    w.wait_for(rf"^ready {w.pid}$", start=mark)
    w.wait_for(r"^count 3$", start=mark)
    assert os.path.basename(os.readlink(f"/proc/{w.pid}/exe")) == "counter"


def test_pre_dump_is_refused(spawn, tmp_path, cleanup_pids):
    w = spawn("counter")
    pycr("pre-dump", "-t", w.pid, "-D", tmp_path / "pre")
    line = one_line_error(pycr("restore", "-D", tmp_path / "pre", "-d", expect=1))
    assert "pre-dump cannot be restored" in line
    procutil.assert_running_untraced(w.pid)


def test_shrunk_file(spawn, tmp_path, cleanup_pids):
    data = tmp_path / "data"
    w = spawn("openfile", data)
    w.wait_for(r"^fd \d+$")
    dump(w, tmp_path / "img")
    os.truncate(data, 100)
    line = _fails(tmp_path / "img", cleanup_pids, [w.pid])
    assert str(data) in line and "shrank" in line
    assert not procutil.exists(w.pid)


CREDS_SCRIPT = """#!{python}
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
os.setgroups([65533])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
os.write(fd, ("ready %d\\n" % os.getpid()).encode())
while True:
    os.write(fd, ("ids %s %s\\n" % (os.getresuid(), os.getresgid())).encode().replace(b" ", b""))
    time.sleep(0.02)
"""


def test_credentials_of_an_unprivileged_process(spawn_python, tmp_path, cleanup_pids):
    w = spawn_python("creds", CREDS_SCRIPT)
    before = {k: procutil.status(w.pid)[k] for k in ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff",
                                                       "CapBnd", "CapAmb")}
    assert before["Uid"].split() == ["65534"] * 4 and before["CapEff"] == "0" * 16
    dump(w, tmp_path / "img")
    mark = w.mark()
    restore(tmp_path / "img", cleanup_pids, [w.pid])
    w.wait_for(r"^ids", start=mark)
    after = {k: procutil.status(w.pid)[k] for k in before}
    assert after == before


def test_mapped_file_changed_since_the_dump_is_refused(workloads, tmp_path, cleanup_pids):
    """A program whose executable was replaced after the dump is refused by name before
    any task exists (it would run on code it was not dumped with); the same file copied
    back with its time (cp -p) restores."""
    import shutil
    import subprocess
    exe, status = tmp_path / "counter-copy", tmp_path / "copy.status"
    shutil.copy2(workloads["counter"], exe)

    def lines():
        return status.read_bytes().count(b"\n") if status.exists() else 0

    def wait_more(than):
        deadline = time.monotonic() + 10
        while lines() <= than:
            assert time.monotonic() < deadline, status.read_bytes()[-200:]
            time.sleep(0.01)

    p = subprocess.Popen([str(exe), str(status)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    # Reaped as soon as the dump kills it, as a shell reaps its jobs: the dump waits until its PID is free.
    threading.Thread(target=p.wait, daemon=True).start()
    cleanup_pids.add(p.pid)
    wait_more(2)
    pycr("dump", "-t", p.pid, "-D", tmp_path / "img")
    p.wait()
    cleanup_pids.add(p.pid)             # again, now free: the restored task has another start time
    shutil.copy2(workloads["counter"], tmp_path / "saved")          # the same bytes and time
    shutil.copy(workloads["threads"], exe)                           # another program, same path
    line = one_line_error(pycr("restore", "-D", tmp_path / "img", "-d", expect=1))
    assert line.startswith(f"pycr: pid {p.pid}: mapped file {exe} changed since the dump")
    assert not procutil.exists(p.pid)
    os.replace(tmp_path / "saved", exe)                              # new inode, same content and time
    before = lines()
    pycr("restore", "-D", tmp_path / "img", "-d")
    wait_more(before)


def test_stopped_process_comes_back_stopped(spawn, tmp_path, cleanup_pids):
    """A process in a job-control stop (SIGSTOP) at dump time is stopped after restore,
    and SIGCONT lets it go on from where it was."""
    w = spawn("counter")
    w.wait_for(r"^count 3$")
    os.kill(w.pid, signal.SIGSTOP)
    assert procutil.wait_until(lambda: procutil.state(w.pid) == "T")
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img")
    mark = w.mark()
    cleanup_pids.add(w.pid)
    restored = pycr("restore", "-D", tmp_path / "img", "-d")
    assert restored.stdout.rstrip().endswith(f"root pid {w.pid} is stopped, as it was at the dump (SIGCONT it)")
    assert procutil.wait_until(lambda: procutil.state(w.pid) == "T") and procutil.tracer_pid(w.pid) == 0
    assert w.mark() == mark          # it ran no step between the restore and the SIGCONT
    os.kill(w.pid, signal.SIGCONT)
    w.wait_for(r"^count \d+$", start=mark)


_FOREIGN_SESSION_DRIVER = r"""
import os, subprocess, sys, time
counter, img = sys.argv[1], sys.argv[2]
status = os.path.join(img + ".status")
w = subprocess.Popen([counter, status, "10"])          # no setsid: the session stays the caller's
sys.excepthook = lambda *exc: (sys.__excepthook__(*exc), os.kill(w.pid, 9), os._exit(1))
def count():
    if not os.path.exists(status): return 0
    with open(status) as f:
        lines = [l.split() for l in f.read().splitlines() if l.startswith("count ")]
    return int(lines[-1][1]) if lines else 0
while count() < 3: time.sleep(0.02)
sid_before = open(f"/proc/{w.pid}/stat").read().rsplit(")", 1)[1].split()[3]
pycr = [sys.executable, "-m", "pycr"]
dump = subprocess.Popen(pycr + ["dump", "-t", str(w.pid), "-D", img])
w.wait()                                               # reaped here, so the dump sees its PID free
assert dump.wait() == 0
n = count()
subprocess.run(pycr + ["restore", "-D", img, "-d"], check=True)
deadline = time.time() + 10
while count() <= n + 5 and time.time() < deadline: time.sleep(0.02)
print(sid_before, n, count(), flush=True)
os.kill(w.pid, 9)
"""


def test_a_session_whose_leader_is_outside_the_pid_namespace(workloads, tmp_path):
    """A program started in a PID namespace without setsid (a container's first
    shell, a CI runner) is in a session whose leader the namespace cannot see:
    /proc shows session 0. pycr dumps and restores it there, and it counts on."""
    import subprocess
    import sys
    p = subprocess.run(["unshare", "-pmf", "--mount-proc", "--kill-child", "--",
                        sys.executable, "-c", _FOREIGN_SESSION_DRIVER, workloads["counter"],
                        str(tmp_path / "img")],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    sid_before, n, after = p.stdout.splitlines()[-1].split()
    assert sid_before == "0"
    assert int(after) > int(n) + 5
