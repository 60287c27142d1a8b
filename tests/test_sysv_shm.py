"""SysV shared memory comes back: the segments' key, id, mode, size and contents, every attachment
at its address, shared between processes again; a segment marked for removal is marked again."""

import ctypes
import hashlib
import signal

import pytest

from checkpointing import Follower, migrate_with_new_contents
from pycrcmd import one_line_error, pycr
from workload_prelude import WORKLOAD_PRELUDE

libc = ctypes.CDLL(None, use_errno=True)
libc.shmctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]

# Every workload here: shmat and shmctl callable through ctypes.
SHM_CALLS = WORKLOAD_PRELUDE + r"""import ctypes, hashlib
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
libc.shmctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
"""

# Both dump workloads: a segment of the test's key (filled with a known pattern) and a private one.
SEGMENTS = SHM_CALLS + r"""key = int(sys.argv[2], 0)
SIZE = 3 * 4096 + 100
shmid = libc.shmget(key, SIZE, 0o1000 | 0o2000 | 0o640)           # IPC_CREAT | IPC_EXCL
addr = libc.shmat(shmid, None, 0)
ctypes.memmove(addr, bytes((i * 13) % 256 for i in range(SIZE)), SIZE)
gone = libc.shmget(0, 8192, 0o1000 | 0o600)                       # IPC_PRIVATE
gaddr = libc.shmat(gone, None, 0)
def write_and_stat():
    # The parent's turn: a write its child sees, then IPC_STAT on the id it had.
    ctypes.memmove(addr + 8192, b"parent wrote", 12)
    ds = ctypes.create_string_buffer(112)
    return libc.shmctl(shmid, 2, ds) == 0
"""

SHM_SCRIPT = SEGMENTS + r"""ctypes.memmove(gaddr + 4096, b"marked for removal", 18)
libc.shmctl(gone, 0, None)                                         # IPC_RMID while attached
def sha(a, n):
    return hashlib.sha256(ctypes.string_at(a, n)).hexdigest()[:16]
child = os.fork()
if child == 0:
    mine = libc.shmat(shmid, None, 0o10000)                       # SHM_RDONLY, a second attachment
    report("child %d" % os.getpid())
else:
    report("ids %d %d at %x %x" % (shmid, gone, addr, gaddr))
    report("ready %d" % os.getpid())
while True:
    wait_for_sigusr1()
    if child:
        ok = write_and_stat()
        report("parent stat %s sha %s gone %s" % (ok, sha(addr, SIZE), ctypes.string_at(gaddr + 4096, 18).decode()))
    else:
        report("child sees %s %s" % (ctypes.string_at(mine + 8192, 12).decode(), sha(mine, 8192)))
"""


def _segments():
    with open("/proc/sysvipc/shm") as f:
        lines = f.read().splitlines()
    names = lines[0].split()
    return {int(v[1]): dict(zip(names, v)) for v in (line.split() for line in lines[1:])}


def _remove(shmid):
    libc.shmctl(shmid, 0, None)


@pytest.fixture
def shm_key():
    import os
    key = 0x7C000000 | (os.getpid() & 0xFFFF) << 4
    yield key
    for shmid, row in _segments().items():
        if int(row["key"]) & 0xFFFFFFFF == key:
            _remove(shmid)


def _start(spawn, tmp_path, key):
    import sys
    script = tmp_path / "shm.py"
    script.write_text(SHM_SCRIPT.replace("{python}", sys.executable))
    script.chmod(0o755)
    w = spawn(str(script), hex(key))
    ids = w.wait_for(r"^ids (\d+) (\d+) at").group(0).split()
    child = int(w.wait_for(r"^child (\d+)$").group(1))
    return w, int(ids[1]), int(ids[2]), child


def test_sysv_segments_come_back_attached_and_shared(spawn, tmp_path, cleanup_pids, shm_key):
    w, shmid, gone, child = _start(spawn, tmp_path, shm_key)
    before = _segments()
    maps_before = open(f"/proc/{w.pid}/maps").read().count("/SYSV")
    dump_dir = tmp_path / "img"
    pycr("dump", "-t", w.pid, "-D", dump_dir)
    cleanup_pids.add(w.pid, child)
    assert gone not in _segments()          # the tree is gone, so is the segment it had removed
    pycr("restore", "-D", dump_dir, "-d")
    segs = _segments()
    assert int(segs[shmid]["key"]) & 0xFFFFFFFF == shm_key
    assert segs[shmid]["nattch"] == before[shmid]["nattch"] == "3"     # parent, child's fork copy, child's own
    assert open(f"/proc/{w.pid}/maps").read().count("/SYSV") == maps_before
    with open("/proc/sys/kernel/shm_next_id") as f:
        assert f.read().strip() == "-1"    # pycr left no chosen id behind for somebody else
    # The removed one is back with its id (this kernel lets root choose it), marked for removal again.
    assert (segs[gone]["key"], segs[gone]["perms"], segs[gone]["nattch"]) == ("0", before[gone]["perms"], "2")
    assert int(before[gone]["perms"], 8) & 0o1000
    size = 3 * 4096 + 100
    data = bytearray((i * 13) % 256 for i in range(size))
    data[8192:8204] = b"parent wrote"
    sha = lambda b: hashlib.sha256(bytes(b)).hexdigest()[:16]  # noqa: E731
    got = w.signal_and_wait(signal.SIGUSR1, r"^parent (.*)$").group(1)
    assert got == f"stat True sha {sha(data)} gone marked for removal"
    got = w.signal_and_wait(signal.SIGUSR1, r"^child sees (.*)$", pid=child).group(1)
    assert got == f"parent wrote {sha(data[:8192])}"


def test_a_key_held_by_another_segment_is_refused(spawn, tmp_path, cleanup_pids, shm_key):
    w, shmid, _, child = _start(spawn, tmp_path, shm_key)
    dump_dir = tmp_path / "img"
    pycr("dump", "-t", w.pid, "-D", dump_dir)
    cleanup_pids.add(w.pid, child)
    _remove(shmid)
    other = libc.shmget(shm_key, 4096, 0o1000 | 0o600)
    assert other >= 0
    proc = pycr("restore", "-D", dump_dir, "-d", expect=1)
    assert one_line_error(proc) == (f"pycr: SysV shared memory key {shm_key:#x} is in use on this host by segment "
                                    f"{other} (remove it with ipcrm, or restore elsewhere)")
    assert [i for i, r in _segments().items() if int(r["key"]) & 0xFFFFFFFF == shm_key] == [other]


MIGRATE_SCRIPT = SEGMENTS + r"""libc.shmctl(gone, 0, None)                                         # IPC_RMID while attached
def write_gen(n):
    ctypes.memmove(addr + 4096, b"gen %04d" % n, 8)
    ctypes.memmove(gaddr + 4096, b"gone %04d" % n, 9)
child = os.fork()
if child == 0:
    mine = libc.shmat(shmid, None, 0o10000)                       # SHM_RDONLY, a second attachment
    report("child %d" % os.getpid())
else:
    generations(write_gen)
    report("ids %d %d" % (shmid, gone))
    report("ready %d" % os.getpid())
while True:
    wait_for_sigusr1()
    if child:
        ok = write_and_stat()
        digest = hashlib.sha256(ctypes.string_at(addr, SIZE)).hexdigest()[:16]
        report("parent stat %s sees %s %s sha %s" % (ok, ctypes.string_at(addr + 4096, 8).decode(),
               ctypes.string_at(gaddr + 4096, 9).decode(), digest))
    else:
        report("child sees %s %s" % (ctypes.string_at(mine + 8192, 12).decode(),
                                     ctypes.string_at(mine + 4096, 8).decode()))
"""


def test_sysv_segments_move_with_pycr_migrate(spawn, tmp_path, cleanup_pids, shm_key):
    """Attached where they were, shared again, with the final pass's contents; the source's kill leaves them."""
    import sys
    from test_migrate import ns_tasks, signal_and_wait

    script = tmp_path / "shm_migrate.py"
    script.write_text(MIGRATE_SCRIPT.replace("{python}", sys.executable))
    script.chmod(0o755)
    w = spawn(str(script), hex(shm_key))
    shmid, gone = map(int, w.wait_for(r"^ids (\d+) (\d+)$").groups())
    child = int(w.wait_for(r"^child (\d+)$").group(1))
    w.wait_for(r"^gen 1$")
    res = migrate_with_new_contents(w, cleanup_pids, child)
    got = ns_tasks(res.summary.init_real)
    root, replica_child = got[w.pid][0], got[child][0]
    segs = _segments()
    assert [i for i, r in segs.items() if int(r["key"]) & 0xFFFFFFFF == shm_key] == [shmid]
    assert segs[shmid]["nattch"] == "3"     # the replica's parent, child's fork copy, child's own
    assert segs[gone]["nattch"] == "2" and int(segs[gone]["perms"], 8) & 0o1000    # still marked for removal
    size = 3 * 4096 + 100
    data = bytearray((i * 13) % 256 for i in range(size))
    data[4096:4104] = b"gen 0003"
    data[8192:8204] = b"parent wrote"
    got = signal_and_wait(w, root, signal.SIGUSR1, r"^parent (.*)$").group(1)
    assert got == f"stat True sees gen 0003 gone 0003 sha {hashlib.sha256(bytes(data)).hexdigest()[:16]}"
    got = signal_and_wait(w, replica_child, signal.SIGUSR1, r"^child sees (.*)$").group(1)
    assert got == "parent wrote gen 0003"


FOLLOW_SCRIPT = SHM_CALLS + r"""seg = libc.shmget(0, 8192, 0o1000 | 0o600)                         # IPC_PRIVATE
addr = libc.shmat(seg, None, 0)
libc.shmctl(seg, 0, None)                                          # IPC_RMID: it goes with its last user
generations(lambda n: ctypes.memmove(addr + 4096, b"gen %04d" % n, 8))
report("at %x" % addr)
report("ready %d" % os.getpid())
while True:
    wait_for_sigusr1()
    report("sees %s" % ctypes.string_at(addr + 4096, 8).decode())
"""


def test_restore_follow_refills_a_segment_it_made_every_pass(spawn, tmp_path, cleanup_pids):
    """From images alone (no source to take it from) the replica's segment is pycr's, and each pass refills it."""
    import sys
    from test_migrate import signal_and_wait

    script = tmp_path / "shm_follow.py"
    script.write_text(FOLLOW_SCRIPT.replace("{python}", sys.executable))
    script.chmod(0o755)
    w = spawn(str(script))
    addr = int(w.wait_for(r"^at ([0-9a-f]+)$").group(1), 16)
    top = tmp_path / "passes"
    top.mkdir()
    with Follower(top) as follower:
        pycr("pre-dump", "-t", w.pid, "-D", top / "a")
        replica = follower.stopped_replica(cleanup_pids)
        w.signal_and_wait(signal.SIGUSR2, r"^gen 2$")
        pycr("pre-dump", "-t", w.pid, "-D", top / "b", "--prev-images-dir", "../a")
        w.signal_and_wait(signal.SIGUSR2, r"^gen 3$")
        pycr("dump", "-t", w.pid, "-D", top / "c", "--prev-images-dir", "../b")
        follower.finish()
    with open(f"/proc/{replica}/maps") as f:
        assert [line.split()[0].split("-")[0] for line in f if "/SYSV" in line] == [f"{addr:x}"]
    assert signal_and_wait(w, replica, signal.SIGUSR1, r"^sees (.*)$").group(1) == "gen 0003"
