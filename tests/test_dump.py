"""pycr dump against real processes: what the images hold, and what happens to the tree."""

import json
import os
import signal
import subprocess
import sys
import zlib

import pytest

import procutil
from pycr.ptrace.xstate import local_layout
from pycrcmd import one_line_error, pycr
from pycr.images import ImageDir, read_memory


def test_counter_leave_running_goes_on(spawn, tmp_path):
    w = spawn("counter")
    w.wait_for(r"^count 5$")
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img", "--leave-running")
    procutil.assert_running_untraced(w.pid)
    n = int(w.last("count").split()[1])
    w.wait_for(rf"^count {n + 5}$")
    img = ImageDir(tmp_path / "img")
    inv = img.read("inventory")
    assert inv.root_pid == w.pid and inv.kind == "dump"
    tree = img.read("pstree")
    assert [p.pid for p in tree.processes] == [w.pid]
    core = img.read("core", w.pid)
    assert core.comm == "counter"
    assert core.threads[0].tid == w.pid
    # The USR1 handler the workload installed is in the image.
    assert core.sigactions[signal.SIGUSR1 - 1].handler > 1
    # stdout and stderr share one open file description (2>&1): the image says so.
    fds = {f.fd: f for f in img.read("files").processes[0].fds}
    assert fds[1].file_id == fds[2].file_id != fds[0].file_id
    # Images are readable by the owner only.
    for name in os.listdir(tmp_path / "img"):
        assert os.stat(tmp_path / "img" / name).st_mode & 0o077 == 0


def test_dump_kills_by_default_and_frees_pids(spawn, tmp_path):
    w = spawn("tree")
    pids = w.pids()
    assert len(pids) == 4
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img")
    # When pycr returns, every PID of the tree is free again.
    # Free: not even a zombie is left (pycr waits until each is reaped).
    assert [(p, procutil.state(p)) for p in pids if procutil.exists(p)] == []


def test_tree_identity(spawn, tmp_path):
    w = spawn("tree")
    pids = w.pids()
    expect = {p: (procutil.ppid(p), procutil.pgid(p), procutil.sid(p)) for p in pids}
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img", "-R")
    tree = ImageDir(tmp_path / "img").read("pstree")
    got = {p.pid: (p.ppid, p.pgid, p.sid) for p in tree.processes}
    assert got == expect
    assert len({pgid for _, pgid, _ in expect.values()}) > 1   # the workload has 2 groups
    seen = set()
    for p in tree.processes:   # parents first
        assert p.ppid in seen or p.pid == w.pid
        seen.add(p.pid)
    procutil.assert_running_untraced(*pids)


def test_threads_all_saved(spawn, tmp_path):
    w = spawn("threads")
    tids = sorted(w.threads())
    assert len(tids) >= 4
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img", "-R")
    core = ImageDir(tmp_path / "img").read("core", w.pid)
    assert sorted(t.tid for t in core.threads) == tids
    assert core.threads[0].tid == w.pid
    # Each thread's whole XSAVE area: the size CPUID leaf 0xD gives for this kernel's XCR0.
    size = local_layout().size
    for t in core.threads:
        assert len(t.xstate) == size and t.regs.cs == 0x33
        assert int.from_bytes(t.xstate[464:472], "little") == local_layout().xcr0
    procutil.assert_running_untraced(w.pid)


def test_bigmem_checksum_from_images(spawn, tmp_path):
    w = spawn("bigmem", 256)
    _, addr, size = w.last("region").split()
    addr, size = int(addr, 16), int(size)
    expected = int(w.signal_and_wait(signal.SIGUSR1, r"^sum (\w+)$").group(1), 16)
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img", "-R", timeout=300)
    data = read_memory(tmp_path / "img", str(w.pid), addr, size)
    got = (zlib.crc32(data) << 32) | zlib.adler32(data)
    assert got == expected
    # Memory untouched by the dump: the process computes the same sum again.
    assert int(w.signal_and_wait(signal.SIGUSR1, r"^sum (\w+)$").group(1), 16) == expected


def test_open_file_offset(spawn, tmp_path):
    target = tmp_path / "data"
    w = spawn("openfile", target)
    offset = int(w.signal_and_wait(signal.SIGUSR1, r"^offset (\d+)$").group(1))
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img", "-R")
    files = ImageDir(tmp_path / "img").read("files")
    fds = {f.fd: f for p in files.processes if p.pid == w.pid for f in p.fds}
    match = [f for f in fds.values() if f.path == str(target)]
    assert len(match) == 1 and match[0].type == "reg" and match[0].pos == offset
    assert set(fds) >= {0, 1, 2}


def test_pipe_data_saved_and_left_in_place(spawn, tmp_path):
    w = spawn("pipe")
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img", "-R")
    img = ImageDir(tmp_path / "img")
    files = img.read("files")
    pipe_ids = {f.pipe_id for p in files.processes for f in p.fds if f.type == "pipe"}
    assert len(pipe_ids) == 1
    pipe_id = next(iter(pipe_ids))
    data = {p.pipe_id: p.data for p in img.read("pipes-data").pipes}
    assert data == {pipe_id: b"pycr pipe message 0123456789"}
    # The child still reads the whole message: the dump consumed nothing.
    child = procutil.children(w.pid)[0]
    got = w.signal_and_wait(signal.SIGUSR1, r"^got (\w+)$", pid=child).group(1)
    assert bytes.fromhex(got) == b"pycr pipe message 0123456789"


def test_seccomp_target_is_dumpable(spawn, tmp_path):
    w = spawn("seccomp")
    before = w.signal_and_wait(signal.SIGUSR1, r"^filtered errno (\d+)$").group(1)
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img", "-R")
    core = ImageDir(tmp_path / "img").read("core", w.pid)
    assert core.seccomp_mode == "filter" and len(core.seccomp_filters) >= 1
    assert w.signal_and_wait(signal.SIGUSR1, r"^filtered errno (\d+)$").group(1) == before


def test_show_json_round_trip_every_image(spawn, tmp_path):
    w = spawn("counter")
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img", "-R")
    shown = json.loads(pycr("show", tmp_path / "img", "--json").stdout)
    assert "inventory.img" in shown and f"core-{w.pid}.img" in shown
    for name in os.listdir(tmp_path / "img"):
        if name.startswith("pages-"):
            continue
        doc = pycr("show", tmp_path / "img" / name, "--json").stdout
        (tmp_path / "doc.json").write_text(doc)
        pycr("encode", "-i", tmp_path / "doc.json", "-o", tmp_path / "again.img")
        assert (tmp_path / "again.img").read_bytes() == (tmp_path / "img" / name).read_bytes(), name


def test_bad_pid(tmp_path):
    pid = procutil.free_pids(1)[0]
    proc = pycr("dump", "-t", pid, "-D", tmp_path / "img", expect=1)
    assert "no such process" in one_line_error(proc)


def test_unwritable_directory_leaves_tree_running(spawn, tmp_path):
    w = spawn("counter")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = pycr("dump", "-t", w.pid, "-D", blocker / "img", expect=1)
    assert "cannot write images" in one_line_error(proc)
    n = int(w.last("count").split()[1])
    w.wait_for(rf"^count {n + 3}$")
    procutil.assert_running_untraced(w.pid)


def test_disk_full_is_one_line_and_tree_untouched(spawn, small_fs):
    w = spawn("bigmem", 32)
    before = w.signal_and_wait(signal.SIGUSR1, r"^sum (\w+)$").group(1)
    proc = pycr("dump", "-t", w.pid, "-D", small_fs / "img", expect=1)
    assert "no space left on device" in one_line_error(proc).lower()
    procutil.assert_running_untraced(w.pid)
    assert w.signal_and_wait(signal.SIGUSR1, r"^sum (\w+)$").group(1) == before
    # Nothing of the failed dump is left: the directory it made is gone with its files.
    assert not os.path.exists(small_fs / "img")


def test_failed_copy_leaves_pages_file_writable(spawn, tmp_path):
    """A live copy that faults falls back to writing run by run: the pages
    file must not be left in O_DIRECT mode, which refuses unaligned writes."""
    import errno
    import fcntl
    from array import array
    from pycr.collect.memory import copy_runs
    w = spawn("bigmem", 1)
    _, addr, size = w.last("region").split()
    addr, size = int(addr, 16), int(size)
    vmas = [{"start": addr, "end": addr + size, "prot": 3}]
    runs = array("Q", [addr, size, 0x1000, 4096])      # the second run is never mapped
    fd = os.open(tmp_path / "pages", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError) as info:
            copy_runs(w.pid, runs, vmas, fd)
        assert info.value.errno == errno.EFAULT
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
        assert os.write(fd, b"x" * 100) == 100
    finally:
        os.close(fd)


LATE_REAPER_SCRIPT = """#!{python}
import os, sys, threading, time
st = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
def report(line):
    os.write(st, (line + "\\n").encode())
child = os.fork()
if child == 0:
    for _ in range(3):
        threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
    report("child %d" % os.getpid())
    while True:
        time.sleep(0.1)
report("ready %d" % os.getpid())
os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT)   # its exit seen, not reaped
report("exited")
time.sleep(0.5)
report("reaping")
os.waitpid(child, 0)
while True:
    time.sleep(0.1)
"""


def test_dump_returns_once_a_late_parent_outside_reaps(spawn_python, tmp_path):
    # The dumped process's parent is outside the tree and reaps it 0.5 s after its
    # death: the dump may only return once it has, since a restore needs the PID.
    parent = spawn_python("late_reaper", LATE_REAPER_SCRIPT)
    child = int(parent.wait_for(r"^child (\d+)$").group(1))
    assert len(procutil.threads(child)) == 4
    pycr("dump", "-t", child, "-D", tmp_path / "img")
    assert not procutil.exists(child)     # not even a zombie: the late reap happened first
    assert parent.last("reaping") is not None and procutil.exists(parent.pid)
