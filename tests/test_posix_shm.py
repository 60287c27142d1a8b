"""POSIX shared memory (shm_open: a file on the tmpfs at /dev/shm) comes back shared: a mapping in
two processes and an fd are one file again; an object unlinked while mapped comes back unlinked."""

import hashlib
import os
import signal

import pytest

from pycrcmd import pycr

SCRIPT = r"""#!{python}
import hashlib, mmap, os, signal, sys, time
st = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
def report(line):
    os.write(st, (line + "\n").encode())
name = sys.argv[2]
fd = os.open("/dev/shm/" + name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)   # shm_open
os.ftruncate(fd, 5 * 4096)
m = mmap.mmap(fd, 5 * 4096)
m[:4096 * 2] = bytes(i % 199 for i in range(8192))
gfd = os.open("/dev/shm/" + name + "-gone", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
os.ftruncate(gfd, 4096)
g = mmap.mmap(gfd, 4096)
os.close(gfd)
g[:12] = b"unlinked obj"
os.unlink("/dev/shm/" + name + "-gone")                                     # shm_unlink while mapped
go = []
signal.signal(signal.SIGUSR1, lambda *a: go.append(1))
child = os.fork()
report("child %d" % os.getpid() if child == 0 else "ready %d" % os.getpid())
while True:
    while not go:
        time.sleep(0.01)
    go.pop()
    if child:
        m[3 * 4096:3 * 4096 + 6] = b"parent"
        report("parent fd-sees %r sha %s gone %r" % (os.pread(fd, 6, 3 * 4096),
               hashlib.sha256(m[:8192]).hexdigest()[:16], bytes(g[:12])))
    else:
        report("child sees %r" % bytes(m[3 * 4096:3 * 4096 + 6]))
"""


@pytest.fixture
def shm_name():
    name = f"pycr-test-{os.getpid()}"
    yield name
    for path in (f"/dev/shm/{name}", f"/dev/shm/{name}-gone"):
        if os.path.exists(path):
            os.unlink(path)


def test_posix_shm_comes_back_shared(spawn, tmp_path, cleanup_pids, shm_name):
    import sys
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this machine")
    script = tmp_path / "pshm.py"
    script.write_text(SCRIPT.replace("{python}", sys.executable))
    script.chmod(0o755)
    w = spawn(str(script), shm_name)
    child = int(w.wait_for(r"^child (\d+)$").group(1))
    dump_dir = tmp_path / "img"
    pycr("dump", "-t", w.pid, "-D", dump_dir)
    cleanup_pids.add(w.pid, child)
    pycr("restore", "-D", dump_dir, "-d")
    with open(f"/proc/{w.pid}/maps") as f:
        maps = f.read()
    assert f"/dev/shm/{shm_name}\n" in maps and f"/dev/shm/{shm_name}-gone (deleted)\n" in maps
    assert not os.path.exists(f"/dev/shm/{shm_name}-gone")
    got = w.signal_and_wait(signal.SIGUSR1, r"^parent (.*)$").group(1)
    sha = hashlib.sha256(bytes(i % 199 for i in range(8192))).hexdigest()[:16]
    assert got == f"fd-sees b'parent' sha {sha} gone b'unlinked obj'"
    got = w.signal_and_wait(signal.SIGUSR1, r"^child (.*)$", pid=child).group(1)
    assert got == "sees b'parent'"
