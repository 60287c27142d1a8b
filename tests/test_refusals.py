"""Every kind the README says a dump refuses, refused by name in one line, the tree left running.

Each case is a small Python workload holding one unsupported resource; the
dump must fail with exactly the one line that names the pid, the fd or the
address, and the kind; the tree runs on untraced, counting, with the same
maps, fds and blocked mask, and no image directory is left behind.
"""

import os

import pytest

import procutil
from pycrcmd import one_line_error, pycr

HOLDER = r"""#!{python}
import ctypes, mmap, os, select, signal, socket, sys, tempfile, time
libc = ctypes.CDLL(None, use_errno=True)
st = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
def report(line):
    os.write(st, (line + "\n").encode())
kind = sys.argv[2]
where = os.path.dirname(sys.argv[1])
keep = []
if kind == "socket":
    s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0); keep.append(s); report("fd %d" % s.fileno())
elif kind == "pidfd":
    report("fd %d" % os.pidfd_open(os.getpid()))
elif kind == "netlink":
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0); keep.append(s); report("fd %d" % s.fileno())
elif kind == "io_uring":
    params = ctypes.create_string_buffer(120)
    report("fd %d" % libc.syscall(425, 4, params))         # io_uring_setup
elif kind == "ghost-too-large":
    path = os.path.join(where, "gone-open")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600); os.ftruncate(fd, (64 << 20) + 1); os.unlink(path)
    report("fd %d %s" % (fd, path))
elif kind == "ghost-too-large-mapped":
    path = os.path.join(where, "gone-mapped")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600); os.ftruncate(fd, (64 << 20) + 1)
    libc.mmap.restype = ctypes.c_void_p          # not Python's mmap: it keeps an fd of the file
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    addr = libc.mmap(None, 8192, 3, 1, fd, 0); os.close(fd); os.unlink(path)
    report("map %x %x %s" % (addr, addr + 8192, path))
elif kind == "deleted-cwd":
    d = os.path.join(where, "gone-dir"); os.mkdir(d); os.chdir(d); os.rmdir(d)
    report("path %s" % d)
elif kind == "hugetlb":
    try:
        m = mmap.mmap(-1, 2 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x40000)   # MAP_HUGETLB
        m[0] = 1
    except OSError as exc:
        report("none %s" % exc.strerror.replace(" ", "_"))
    else:
        keep.append(m)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        report("map %x %x" % (addr, addr + (2 << 20)))
report("ready %d" % os.getpid())
n = 0
while True:
    n += 1
    report("count %d" % n)
    time.sleep(0.01)
"""

CASES = {
    "socket": "pid {pid} fd {fd}: socket (AF_PACKET) is not supported",
    "pidfd": "pid {pid} fd {fd}: [pidfd] is not supported",
    "netlink": "pid {pid} fd {fd}: socket (AF_NETLINK) is not supported",
    "io_uring": "pid {pid} fd {fd}: [io_uring] is not supported",
    "ghost-too-large": "pid {pid} fd {fd}: deleted file {path} holds 67108865 bytes, more than the 67108864 "
                       "bytes a dump saves (--ghost-limit, PYCR_GHOST_LIMIT)",
    "ghost-too-large-mapped": "pid {pid}: mapping {start:#x}-{end:#x}: deleted file {path} holds 67108865 bytes, "
                              "more than the 67108864 bytes a dump saves (--ghost-limit, PYCR_GHOST_LIMIT)",
    "hugetlb": "pid {pid}: hugetlb mapping {start:#x}-{end:#x} is not supported",
    # a restore would find it gone, after the dump had ended the tree
    "deleted-cwd": "pid {pid}: its cwd {path} was deleted: a restore could not enter it again",
}


def snapshot(pid):
    return procutil.coalesced_maps(pid), procutil.fds(pid), procutil.status(pid)["SigBlk"]


@pytest.mark.parametrize("kind", list(CASES))
def test_unsupported_kind_is_refused_by_name(spawn, tmp_path, kind):
    script = tmp_path / "holder.py"
    import sys
    script.write_text(HOLDER.replace("{python}", sys.executable))
    script.chmod(0o755)
    w = spawn(str(script), kind)
    what = w.lines()[0].split()
    if what[0] == "none":
        pytest.skip(f"this kernel gives no hugetlb mapping: {what[1].replace('_', ' ')}")
    fields = dict(pid=w.pid)
    if what[0] == "fd":
        fields.update(fd=int(what[1]), path=what[2] if len(what) > 2 else None)
        assert fields["fd"] >= 0, f"the workload could not make its {kind}"
    elif what[0] == "path":
        fields.update(path=what[1])
    else:
        fields.update(start=int(what[1], 16), end=int(what[2], 16), path=what[3] if len(what) > 3 else None)
    w.wait_for(r"^count \d+$")
    before = snapshot(w.pid)
    proc = pycr("dump", "-t", w.pid, "-D", tmp_path / "img", expect=1)
    assert one_line_error(proc) == "pycr: " + CASES[kind].format(**fields)
    # The tree runs on as it was, and nothing of the dump is left.
    procutil.assert_running_untraced(w.pid)
    n = int(w.last("count").split()[1])
    w.wait_for(rf"^count {n + 3}$")
    assert snapshot(w.pid) == before
    assert not os.path.exists(tmp_path / "img")


def test_a_larger_ghost_limit_takes_the_deleted_file_with_criu_s_options(spawn, tmp_path):
    """criu's --ghost-limit raises the bound the refusal above names; criu's --track-mem is taken too
    (pycr always tracks)."""
    script = tmp_path / "holder.py"
    import sys
    script.write_text(HOLDER.replace("{python}", sys.executable))
    script.chmod(0o755)
    w = spawn(str(script), "ghost-too-large")
    w.wait_for(r"^count \d+$")
    pycr("pre-dump", "-t", w.pid, "-D", tmp_path / "p1", "--track-mem", "--ghost-limit", "65M")
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img", "-R", "--prev-images-dir", "../p1", "--track-mem",
         "--ghost-limit", "65M")
    procutil.assert_running_untraced(w.pid)
    assert "pages-ghost-1.img" in os.listdir(tmp_path / "img")     # the deleted file's contents, taken
