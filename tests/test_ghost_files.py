"""Files deleted while open or mapped come back deleted, with their contents, size and mode,
and the program goes on writing to them."""

import hashlib
import os
import signal

from checkpointing import migrate_with_new_contents, migrated
from pycrcmd import pycr
from workload_prelude import MAP_AND_FD_WRITES, WORKLOAD_PRELUDE

GHOST_SCRIPT = WORKLOAD_PRELUDE + r"""import hashlib, mmap
where = os.path.dirname(sys.argv[1])
log_path = os.path.join(where, "ghost.log")
log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
os.write(log, b"".join(b"line %d\n" % i for i in range(1000)))
reader = os.open(log_path, os.O_RDONLY)
os.lseek(reader, 10, 0)
map_path = os.path.join(where, "ghost.map")
mfd = os.open(map_path, os.O_RDWR | os.O_CREAT, 0o600)
os.pwrite(mfd, bytes(range(256)) * 64, 0)
os.pwrite(mfd, b"tail", 1 << 20)                 # a hole in the middle
m = mmap.mmap(mfd, (1 << 20) + 4)
os.close(mfd)
os.unlink(log_path)
os.unlink(map_path)
report("ready %d" % os.getpid())
while True:
    wait_for_sigusr1()
    os.write(log, b"appended\n")
    st_log = os.fstat(log)
    m[5:9] = b"WXYZ"
    report("log size %d mode %o nlink %d sha %s reader %r map sha %s link %s" % (
        st_log.st_size, st_log.st_mode & 0o777, st_log.st_nlink,
        hashlib.sha256(os.pread(reader, st_log.st_size, 0)).hexdigest()[:16],
        os.read(reader, 6), hashlib.sha256(m[:]).hexdigest()[:16], os.readlink("/proc/self/fd/%d" % log)))
"""


def _expected(where):
    log = b"".join(b"line %d\n" % i for i in range(1000)) + b"appended\n"
    mapped = bytearray((1 << 20) + 4)
    mapped[: 256 * 64] = bytes(range(256)) * 64
    mapped[1 << 20:] = b"tail"
    mapped[5:9] = b"WXYZ"
    sha = lambda b: hashlib.sha256(bytes(b)).hexdigest()[:16]  # noqa: E731
    return (f"log size {len(log)} mode 640 nlink 0 sha {sha(log)} reader {log[10:16]!r} map sha {sha(mapped)} "
            f"link {where}/ghost.log (deleted)")


def _ghost_maps(pid):
    with open(f"/proc/{pid}/maps") as f:
        return sorted(line.split(None, 5)[5].strip() for line in f if "ghost.map" in line)


def test_deleted_files_come_back_deleted_with_their_contents(spawn_python, tmp_path, cleanup_pids):
    w = spawn_python("ghost", GHOST_SCRIPT)
    before = _ghost_maps(w.pid)
    assert before == [f"{tmp_path}/ghost.map (deleted)"]
    dump_dir = tmp_path / "img"
    pycr("dump", "-t", w.pid, "-D", dump_dir)
    cleanup_pids.add(w.pid)
    assert sorted(n for n in os.listdir(dump_dir) if "ghost" in n) == [
        "ghost.img", "pagemap-ghost-1.img", "pagemap-ghost-2.img", "pages-ghost-1.img", "pages-ghost-2.img"]
    pycr("restore", "-D", dump_dir, "-d")
    assert _ghost_maps(w.pid) == before
    assert not os.path.exists(tmp_path / "ghost.log") and not os.path.exists(tmp_path / "ghost.map")
    got = w.signal_and_wait(signal.SIGUSR1, r"^log (.*)$").group(1)
    assert "log " + got == _expected(tmp_path)


def test_a_taken_path_gets_the_ghost_file_beside_it(spawn_python, tmp_path, cleanup_pids):
    w = spawn_python("ghost", GHOST_SCRIPT)
    dump_dir = tmp_path / "img"
    pycr("dump", "-t", w.pid, "-D", dump_dir)
    cleanup_pids.add(w.pid)
    (tmp_path / "ghost.log").write_text("someone else's\n")
    pycr("restore", "-D", dump_dir, "-d")
    got = w.signal_and_wait(signal.SIGUSR1, r"^log (.*)$").group(1)
    assert "log " + got == _expected(tmp_path).replace("ghost.log (deleted)", "ghost.log.pycr-ghost-1 (deleted)")
    assert (tmp_path / "ghost.log").read_text() == "someone else's\n"


MIGRATE_SCRIPT = WORKLOAD_PRELUDE + r"""import fcntl
log_path = os.path.join(os.path.dirname(sys.argv[1]), "moving.log")
log = os.open(log_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
os.write(log, b"before\n")
os.unlink(log_path)
mfd = os.memfd_create("moving", os.MFD_ALLOW_SEALING)
os.write(mfd, b"in memory only")
fcntl.fcntl(mfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
report("ready %d" % os.getpid())
while True:
    wait_for_sigusr1()
    os.write(log, b"after\n")
    try:
        os.pwrite(mfd, b"x", 100); grow = "allowed"
    except PermissionError:
        grow = "EPERM"
    report("log %r link %s memfd %r grow %s" % (os.pread(log, 100, 0), os.readlink("/proc/self/fd/%d" % log),
                                                  os.pread(mfd, 100, 0), grow))
"""


def test_a_deleted_file_and_a_memfd_move_with_pycr_migrate(spawn_python, tmp_path, cleanup_pids):
    w = spawn_python("moving", MIGRATE_SCRIPT)
    root, _ = migrated(w.pid, cleanup_pids, "--max-passes", 2, "--min-delta", "0")
    start = w.mark()
    os.kill(root, signal.SIGUSR1)
    got = w.wait_for(r"^log (.*)$", start=start, root=False).group(1)
    assert got == f"b'before\\nafter\\n' link {tmp_path}/moving.log (deleted) memfd b'in memory only' grow EPERM"


MAPPED_MIGRATE_SCRIPT = WORKLOAD_PRELUDE + r"""import hashlib, mmap
path = os.path.join(os.path.dirname(sys.argv[1]), "moving.map")
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
os.pwrite(fd, bytes(range(256)) * 32, 0)
os.ftruncate(fd, 5 * 4096)
m = mmap.mmap(fd, 5 * 4096)
view = mmap.mmap(fd, 5 * 4096, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
os.unlink(path)
FD_GEN_AT = 4 * 4096
""" + MAP_AND_FD_WRITES + r"""generations(write_gen)
report("ready %d" % os.getpid())
while True:
    wait_for_sigusr1()
    write_both_ways()
    report("seen fd-sees %s map-sees %s view-sees %s %s gen %s, %s sha %s nlink %d link %s" % (
        os.pread(fd, 7, 8192).decode(), m[8300:8306].decode(), view[8192:8199].decode(), view[8300:8306].decode(),
        os.pread(fd, 8, 0).decode(), m[4 * 4096:4 * 4096 + 7].decode(), hashlib.sha256(m[:]).hexdigest()[:16],
        os.fstat(fd).st_nlink, os.readlink("/proc/self/fd/%d" % fd)))
"""


def test_a_mapped_deleted_file_moves_with_pycr_migrate(spawn_python, tmp_path, cleanup_pids):
    """Mapped shared and private and open: one deleted file in the replica, with the final pass's contents."""
    from test_migrate import ns_tasks, signal_and_wait

    w = spawn_python("ghost_migrate", MAPPED_MIGRATE_SCRIPT)
    w.wait_for(r"^gen 1$")
    res = migrate_with_new_contents(w, cleanup_pids)
    root = ns_tasks(res.summary.init_real)[w.pid][0]
    where = f"{tmp_path}/moving.map (deleted)"
    with open(f"/proc/{root}/maps") as f:
        assert sorted(line.split(None, 5)[5].strip() for line in f if "moving.map" in line) == [where, where]
    assert not os.path.exists(tmp_path / "moving.map")
    got = signal_and_wait(w, root, signal.SIGUSR1, r"^seen (.*)$").group(1)
    data = bytearray(5 * 4096)
    data[:8192] = bytes(range(256)) * 32
    data[0:8] = b"map 0003"
    data[4 * 4096:4 * 4096 + 7] = b"fd 0003"
    data[8192:8199] = b"via-map"
    data[8300:8306] = b"via-fd"
    sha = hashlib.sha256(bytes(data)).hexdigest()[:16]
    assert got == (f"fd-sees via-map map-sees via-fd view-sees via-map via-fd gen map 0003, fd 0003 "
                   f"sha {sha} nlink 0 link {where}")


TMPFILE_SCRIPT = WORKLOAD_PRELUDE + r"""import hashlib
where = os.path.dirname(sys.argv[1])
tmp = os.open(where, os.O_TMPFILE | os.O_RDWR, 0o600)     # never had a name
os.write(tmp, b"before\n")
report("ready %d" % os.getpid())
while True:
    wait_for_sigusr1()
    os.write(tmp, b"after\n")
    report("tmpfile %r" % os.pread(tmp, 100, 0))
"""


def test_an_o_tmpfile_file_comes_back_with_its_contents(spawn_python, tmp_path, cleanup_pids):
    w = spawn_python("tmpfile", TMPFILE_SCRIPT)
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img")
    cleanup_pids.add(w.pid)
    pycr("restore", "-D", tmp_path / "img", "-d")
    got = w.signal_and_wait(signal.SIGUSR1, r"^tmpfile (.*)$").group(1)
    assert got == repr(b"before\nafter\n")
