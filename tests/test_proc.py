"""pycr.proc against a known, live process."""

import mmap
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from pycr import proc
from pycr.errors import TaskGone
from pycr.proc.stat import parse as parse_stat
from helpers_ptrace import free_pid

CHILD = textwrap.dedent("""
    import mmap, os, sys, threading, time
    path = sys.argv[1]
    f = open(path, "r+b")
    f.seek(1234)
    m = mmap.mmap(f.fileno(), 8192, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    anon_shared = mmap.mmap(-1, 4096, mmap.MAP_SHARED)
    t = threading.Thread(target=time.sleep, args=(60,), daemon=True); t.start()
    os.umask(0o027)
    print(f.fileno(), flush=True)
    sys.stdin.read()
""")


@pytest.fixture
def child(tmp_path):
    data = tmp_path / "mapped.bin"
    data.write_bytes(b"x" * 8192)
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(data)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, close_fds=True, start_new_session=True)
    try:
        fd = int(p.stdout.readline())
        yield p, str(data), fd
    finally:
        p.kill()
        p.wait(10)
        p.stdin.close()
        p.stdout.close()


def test_stat_identity_and_mm_fields(child):
    p, _, _ = child
    st = proc.stat(p.pid)
    assert st.pid == p.pid and st.comm.startswith("python")
    assert st.ppid == os.getpid()
    assert st.pgrp == p.pid and st.session == p.pid     # start_new_session
    assert st.num_threads == 2
    assert st.exit_signal == signal.SIGCHLD
    assert 0 < st.start_code < st.end_code
    assert st.arg_start < st.arg_end <= st.env_start < st.env_end
    with open(f"/proc/{p.pid}/cmdline", "rb") as f:
        assert len(f.read()) == st.arg_end - st.arg_start


def test_status_fields(child):
    p, _, _ = child
    st = proc.status(p.pid)
    assert st.tgid == p.pid and st.ppid == os.getpid()
    assert st.uid == (os.getuid(),) * 4 and st.gid == (os.getgid(),) * 4
    assert st.umask == 0o027
    assert st.nspid[-1] == p.pid
    assert st.cap_bnd != 0 and st.state in "RS"


def test_maps_and_smaps_show_our_mappings(child):
    p, path, _ = child
    vmas = proc.maps(p.pid)
    mine = [v for v in vmas if v.path == path]
    assert len(mine) == 1
    v = mine[0]
    assert v.size == 8192 and v.shared and v.read and v.write and not v.exec
    assert v.kind == "file" and v.inode == os.stat(path).st_ino
    assert [v for v in vmas if v.kind == "shmem" and v.path == "/dev/zero" and v.deleted]
    kinds = {v.kind for v in vmas}
    assert {"heap", "stack", "vdso"} <= kinds
    entries = proc.smaps(p.pid)
    assert [e.vma.start for e in entries] == [v.start for v in vmas]
    stack = next(e for e in entries if e.vma.kind == "stack")
    assert "gd" in stack.vmflags.split() and stack.rss > 0


def test_tasks_children_descendants(child):
    p, _, _ = child
    tids = proc.tasks(p.pid)
    assert tids[0] == p.pid and len(tids) == 2
    assert p.pid in proc.children(os.getpid())
    assert proc.descendants(p.pid) == [p.pid]


def test_fds_and_fdinfo(child):
    p, path, fd = child
    fds = proc.fds(p.pid)
    assert fds[fd] == path
    info = proc.fdinfo(p.pid, fd)
    assert info.pos == 1234
    assert info.flags & os.O_ACCMODE == os.O_RDWR
    assert info.ino == os.stat(path).st_ino


def test_misc(child):
    p, _, _ = child
    assert proc.exe(p.pid) == os.path.realpath(sys.executable)
    assert proc.cwd(p.pid) == os.getcwd() and proc.root(p.pid) == "/"
    assert proc.personality(p.pid) == 0
    rl = proc.rlimits(p.pid)
    assert len(rl) == 16
    import resource
    assert rl[resource.RLIMIT_NOFILE] == resource.getrlimit(resource.RLIMIT_NOFILE)
    pairs = dict(proc.auxv(p.pid))
    assert pairs[6] == mmap.PAGESIZE            # AT_PAGESZ
    assert proc.comm(p.pid).startswith("python")


def test_gone_pid_raises_taskgone():
    pid = free_pid()
    for fn in (proc.stat, proc.status, proc.maps, proc.tasks, proc.fds, proc.exe):
        with pytest.raises(TaskGone):
            fn(pid)


def test_stat_parse_odd_comm():
    line = "42 (a) b (c)) S 1 42 42 0 -1 4194560 " + " ".join(["0"] * 44)
    st = parse_stat(line)
    assert st.comm == "a) b (c)" and st.state == "S" and st.ppid == 1 and st.pgrp == 42
