"""memfds come back as one file per memfd: fds, shared and private mappings, in several
processes, with name, size, contents, offsets and seals."""

import re
import signal

from pycrcmd import pycr
from workload_prelude import MAP_AND_FD_WRITES, WORKLOAD_PRELUDE

MEMFD_SCRIPT = WORKLOAD_PRELUDE + r"""import fcntl, hashlib, mmap
def sha(b):
    return hashlib.sha256(bytes(b)).hexdigest()[:16]
SIZE = 3 * 4096 + 100
data = bytes((i * 7 + 3) % 251 for i in range(SIZE))
fd = os.memfd_create("pycr-test", os.MFD_ALLOW_SEALING)
os.write(fd, data)
os.lseek(fd, 1234, 0)
shared = mmap.mmap(fd, SIZE)
private = mmap.mmap(fd, SIZE, flags=mmap.MAP_PRIVATE)
private[4096:4100] = b"COW!"                 # a private copy of one page
sealed = os.memfd_create("sealed", os.MFD_ALLOW_SEALING)
os.write(sealed, b"frozen" * 1000)
fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
ro = mmap.mmap(sealed, 6000, prot=mmap.PROT_READ)
only = os.memfd_create("mapped-only")
os.ftruncate(only, 8192)
import ctypes
libc = ctypes.CDLL(None)
libc.mmap.restype = ctypes.c_void_p          # not Python's mmap: it would keep an fd of the memfd
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
mo_addr = libc.mmap(None, 8192, 3, 1, only, 0)
os.close(only)
ctypes.memmove(mo_addr + 100, b"no fd left", 10)
seals_before = fcntl.fcntl(sealed, fcntl.F_GET_SEALS)
child = os.fork()
me = "child" if child == 0 else "parent"
report("ready %d" % os.getpid() if child else "child %d" % os.getpid())
while True:
    wait_for_sigusr1()
    if me == "parent":
        pos = os.lseek(fd, 0, 1)
        shared[8192:8200] = b"via-map!"          # seen through the fd and by the child
        through_fd = os.pread(fd, 8, 8192)
        os.pwrite(fd, b"via-fd", 200)            # seen through the mapping
        try:
            os.write(sealed, b"x"); wr = "allowed"
        except PermissionError:
            wr = "EPERM"
        try:
            os.ftruncate(sealed, 1); tr = "allowed"
        except PermissionError:
            tr = "EPERM"
        seals = fcntl.fcntl(sealed, fcntl.F_GET_SEALS)
        report("parent pos %d fd-sees %s map-sees %s size %d private %s %s sealed %s write %s truncate %s "
               "seals %s ro %s mo %s" % (pos, through_fd.decode(), shared[200:206].decode(), os.fstat(fd).st_size,
               bytes(private[4096:4100]).decode(), sha(private[8192:]), sha(os.pread(sealed, 6000, 0)), wr, tr,
               seals == seals_before, sha(ro[:]), ctypes.string_at(mo_addr + 100, 10).decode()))
    else:
        report("child map-sees %s data %s mo %s" % (bytes(shared[8192:8200]).decode(), sha(shared[:8192]),
               ctypes.string_at(mo_addr + 100, 10).decode()))
"""


def _maps_names(pid):
    with open(f"/proc/{pid}/maps") as f:
        return sorted({line.split(None, 5)[5].strip() for line in f if "/memfd:" in line})


def test_memfd_fd_and_mappings_come_back_as_one_file(spawn_python, tmp_path, cleanup_pids):
    w = spawn_python("memfd", MEMFD_SCRIPT)
    child = int(w.wait_for(r"^child (\d+)$").group(1))
    names = _maps_names(w.pid)
    dump_dir = tmp_path / "img"
    pycr("dump", "-t", w.pid, "-D", dump_dir)
    cleanup_pids.add(w.pid, child)
    shown = pycr("show", dump_dir / "memfd.img", "--json").stdout
    assert '"name": "pycr-test"' in shown and '"name": "mapped-only"' in shown
    pycr("restore", "-D", dump_dir, "-d")
    assert _maps_names(w.pid) == names

    import hashlib
    size = 3 * 4096 + 100
    data = bytes((i * 7 + 3) % 251 for i in range(size))
    sha = lambda b: hashlib.sha256(b).hexdigest()[:16]  # noqa: E731
    got = w.signal_and_wait(signal.SIGUSR1, r"^parent (.*)$").group(1)
    # The private mapping's pages it never wrote are the file's: they show the write through the shared one.
    assert got == (f"pos 1234 fd-sees via-map! map-sees via-fd size {size} private COW! "
                   f"{sha(b'via-map!' + data[8200:])} "
                   f"sealed {sha(b'frozen' * 1000)} write EPERM truncate EPERM seals True "
                   f"ro {sha(b'frozen' * 1000)} mo no fd left")
    # The child shares the same memfd: it sees the parent's write through its own mapping.
    got = w.signal_and_wait(signal.SIGUSR1, r"^child map-sees (.*)$", pid=child).group(1)
    expect = bytearray(data[:8192])
    expect[200:206] = b"via-fd"
    assert got == f"via-map! data {sha(bytes(expect))} mo no fd left"
    fd_link = [line for line in open(f"/proc/{w.pid}/maps") if "pycr-test" in line]
    assert all(re.search(r"/memfd:pycr-test \(deleted\)$", line.strip()) for line in fd_link)


MIGRATE_SCRIPT = WORKLOAD_PRELUDE + r"""import mmap
SIZE = 3 * 4096
fd = os.memfd_create("moving-map")
os.ftruncate(fd, SIZE)
os.lseek(fd, 1234, 0)
m = mmap.mmap(fd, SIZE)
FD_GEN_AT = 4096
""" + MAP_AND_FD_WRITES + r"""generations(write_gen)
report("ready %d" % os.getpid())
while True:
    wait_for_sigusr1()
    write_both_ways()
    report("seen pos %d fd-sees %s map-sees %s gen %s, %s" % (
        os.lseek(fd, 0, 1), os.pread(fd, 7, 8192).decode(), m[8300:8306].decode(),
        os.pread(fd, 8, 0).decode(), m[4096:4103].decode()))
"""


def test_a_memfd_open_and_mapped_moves_with_pycr_migrate(spawn_python, cleanup_pids):
    """The replica's mapping and its fd are one memfd, with the final pass's contents."""
    from checkpointing import migrate_with_new_contents
    from test_migrate import ns_tasks, signal_and_wait

    w = spawn_python("memfd_migrate", MIGRATE_SCRIPT)
    w.wait_for(r"^gen 1$")
    res = migrate_with_new_contents(w, cleanup_pids)     # new contents each pass, through fd and mapping
    root = ns_tasks(res.summary.init_real)[w.pid][0]
    got = signal_and_wait(w, root, signal.SIGUSR1, r"^seen (.*)$").group(1)
    assert got == "pos 1234 fd-sees via-map map-sees via-fd gen map 0003, fd 0003"
    assert _maps_names(root) == ["/memfd:moving-map (deleted)"]
