"""State of each mapping beyond its pages: madvise flags, MAP_DROPPABLE, protection keys,
names, and the kernel's own "[...]" mappings."""

import ctypes
import signal
import zlib

import pytest

from pycr.manifest import reseal

import procutil
from pycrcmd import one_line_error, pycr
from workload_prelude import WORKLOAD_PRELUDE
from test_restore import stub_tasks

#: libc's mmap and madvise, for the workloads below.
MADVISE_PRELUDE = WORKLOAD_PRELUDE + """import ctypes, mmap, zlib
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
"""

ADVISED_SCRIPT = MADVISE_PRELUDE + """SIZE = 2 << 20
ADVICE = {{"sr": 2, "rr": 1, "dc": 10, "dd": 16, "mg": 12, "hg": 14, "nh": 15, "wf": 18}}
regions = {{}}
for flag, advice in ADVICE.items():
    addr = libc.mmap(None, SIZE + 4096, 3, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if libc.madvise(addr, SIZE, advice) != 0:
        report("error madvise %s %d" % (flag, ctypes.get_errno()))
    regions[flag] = addr
addr = libc.mmap(None, SIZE, 3, 0x08 | mmap.MAP_ANONYMOUS, -1, 0)      # MAP_DROPPABLE
regions["dp"] = addr
for i, (flag, addr) in enumerate(sorted(regions.items())):
    data = bytes((j * 13 + i) & 0xff for j in range(4096)) * 4
    ctypes.memmove(addr, data, len(data))
    report("region %s %x %d %08x" % (flag, addr, len(data), zlib.crc32(data)))
def on_usr1(*a):
    for flag, addr in sorted(regions.items()):
        n = 4 * 4096
        report("sum %s %08x" % (flag, zlib.crc32(ctypes.string_at(addr, n))))
signal.signal(signal.SIGUSR1, on_usr1)
report("ready %d" % os.getpid())
while True:
    time.sleep(0.05)
"""


def vmflags_at(pid, addr):
    """VmFlags of the VMA holding addr, read from smaps."""
    value = procutil.smaps_field(pid, addr, "VmFlags")
    return None if value is None else set(value.split())


def test_madvise_flags_and_droppable_come_back(spawn_python, tmp_path, cleanup_pids):
    w = spawn_python("advised", ADVISED_SCRIPT)
    regions = {f[0]: (int(f[1], 16), f[3]) for f in w.fields("region")}
    assert not [line for line in w.lines() if line.startswith("error")]
    for flag, (addr, _) in regions.items():
        assert flag in vmflags_at(w.pid, addr), flag
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img")
    cleanup_pids.add(w.pid)
    pycr("restore", "-D", tmp_path / "img", "-d")
    lost = {flag for flag, (addr, _) in regions.items() if flag not in (vmflags_at(w.pid, addr) or set())}
    assert lost == set()
    mark = w.mark()
    w.signal(signal.SIGUSR1)
    w.wait_for(r"^sum wf ", start=mark)
    sums = {f[0]: f[1] for f in w.fields("sum", mark)}
    assert sums == {flag: crc for flag, (_, crc) in regions.items()}
    procutil.assert_running_untraced(w.pid)


def _mm_image(tmp_path, pid):
    from pycr.images import ImageDir
    img = ImageDir(tmp_path / "img")
    return img, img.read("mm", pid)


def _cpu_has_pku():
    from pycr.sysinfo import has_pku
    return has_pku()


def test_protection_key_without_pku_is_refused(spawn, tmp_path, cleanup_pids):
    """An image whose VMA has key 1 cannot come back on a CPU without protection keys:
    refused by name before any task exists."""
    if _cpu_has_pku():
        pytest.skip("this CPU has protection keys: test_protection_keys_come_back covers it")
    w = spawn("counter")
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img")
    img, mm = _mm_image(tmp_path, w.pid)
    anon = next(v for v in mm.vmas if str(v.kind) in ("anon", "heap"))
    anon.pkey = 1
    img.write("mm", mm, w.pid)
    reseal(tmp_path / "img")              # an edit on purpose: only the range checks stand now
    before = stub_tasks()
    cleanup_pids.add(w.pid)
    line = one_line_error(pycr("restore", "-D", tmp_path / "img", "-d", expect=1))
    assert f"{anon.start:#x}-{anon.end:#x} uses protection key 1" in line and "no protection keys" in line
    assert stub_tasks() == before and not procutil.exists(w.pid)


PKEY_SCRIPT = """#!{python}
import ctypes, mmap, os, sys, time
st = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
keys = [libc.syscall(330, 0, 0) for _ in range(3)]          # pkey_alloc: 1, 2, 3
libc.syscall(331, keys[0])                                  # pkey_free(1): key 1 is free again
addr = libc.mmap(None, 3 * 4096, 3, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
libc.syscall(329, ctypes.c_void_p(addr + 4096), 4096, 3, keys[2])   # pkey_mprotect: key 3
os.write(st, ("keyed %x %d\\n" % (addr + 4096, keys[2])).encode())
os.write(st, ("ready %d\\n" % os.getpid()).encode())
while True:
    time.sleep(0.05)
"""


def protection_key_at(pid, addr):
    value = procutil.smaps_field(pid, addr, "ProtectionKey")
    return None if value is None else int(value)


def test_protection_keys_come_back(spawn_python, tmp_path, cleanup_pids):
    if not _cpu_has_pku():
        pytest.skip("this CPU has no protection keys (no pku/ospke in /proc/cpuinfo): no VMA can have a key")
    w = spawn_python("pkeys", PKEY_SCRIPT)
    addr, key = (int(x, 16) if i == 0 else int(x) for i, x in enumerate(w.fields("keyed")[0]))
    assert protection_key_at(w.pid, addr) == key == 3
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img")
    cleanup_pids.add(w.pid)
    pycr("restore", "-D", tmp_path / "img", "-d")
    assert protection_key_at(w.pid, addr) == 3
    assert protection_key_at(w.pid, addr - 4096) == 0


# ---------------------------------------------------------------- what the kernel prints

def _entries(text):
    from pycr.proc.smaps import parse
    return parse(text)


SMAPS = """\
7f0000000000-7f0000001000 r-xp 00000000 00:00 0                          [uprobes]
Rss:                   4 kB
VmFlags: rd ex mr me dc
7f0000100000-7f0000200000 rw-p 00000000 00:00 0                          [anon:jit heap]
Rss:                   0 kB
ProtectionKey:         2
VmFlags: rd wr mr mw me ac
7f0000300000-7f0000400000 rw-s 00000000 00:01 4242                       [anon_shmem:ring]
Rss:                   0 kB
VmFlags: rd wr sh mr mw me ms
7ffc00000000-7ffc00100000 rw-p 00000000 00:00 0                          [stack]
Rss:                   0 kB
VmFlags: rd wr mr mw me gd ac
"""


def test_kernel_mappings_named_and_classified():
    """[uprobes] is left to the kernel; [anon:NAME] is anonymous memory with its name and key;
    [anon_shmem:NAME] is shared anonymous memory saved once as an object, never a path."""
    from pycr.collect.mm import check_supported, read_vmas, vma_record
    vmas = read_vmas(0, _entries(SMAPS))
    assert [v.path for v, _, _ in vmas] == ["[anon:jit heap]", "[anon_shmem:ring]", "[stack]"]
    check_supported(1, vmas)
    recs = [vma_record(*v) for v in vmas]
    assert (recs[0]["kind"], recs[0]["pkey"]) == ("anon", 2)
    assert (recs[1]["kind"], recs[1]["shmem_id"]) == ("shmem", 4242)
    from pycr.collect.memory import private_vmas, shmem_vmas
    assert [v["path"] for v in shmem_vmas(recs)] == ["[anon_shmem:ring]"]
    assert "[anon_shmem:ring]" not in [v["path"] for v in private_vmas(recs)]


@pytest.mark.parametrize("line, vmflags, named", [
    ("7f0000000000-7f0000001000 r--p 00000000 00:00 0 [mystery]", "rd mr", "kernel mapping [mystery]"),
    ("7f0000000000-7f0000200000 rw-p 00000000 00:00 0", "rd wr mr mw me ss", "shadow stack"),
    ("7f0000000000-7f0000200000 rw-p 00000000 00:00 0 [stack]", "rd wr mr mw me ss", "shadow stack"),
])
def test_unknown_and_shadow_stack_mappings_are_refused_by_name(line, vmflags, named):
    from pycr.collect.mm import check_supported
    from pycr.errors import Unsupported
    from pycr.proc.maps import parse_line
    with pytest.raises(Unsupported, match=rf"pid 7: {named.replace('[', '.').replace(']', '.')} "):
        check_supported(7, [(parse_line(line), vmflags, 0)])


def _anon_names_supported():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    import mmap
    m = mmap.mmap(-1, mmap.PAGESIZE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    name = ctypes.create_string_buffer(b"probe")
    ok = libc.prctl(0x53564D41, 0, addr, mmap.PAGESIZE, ctypes.addressof(name)) == 0
    del addr
    return ok


NAMED_SCRIPT = """#!{python}
import ctypes, mmap, os, sys, time, zlib
st = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
def name(addr, size, text):
    buf = ctypes.create_string_buffer(text)
    assert libc.prctl(0x53564D41, 0, addr, size, ctypes.addressof(buf)) == 0, ctypes.get_errno()
priv = libc.mmap(None, 4 * 4096, 3, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
shared = libc.mmap(None, 4 * 4096, 3, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS, -1, 0)
name(priv, 4 * 4096, b"pycr private")
name(shared, 4 * 4096, b"pycr shared")
data = os.urandom(4 * 4096)
ctypes.memmove(priv, data, len(data))
ctypes.memmove(shared, data, len(data))
os.write(st, ("named %x %x %08x\\n" % (priv, shared, zlib.crc32(data))).encode())
os.write(st, ("ready %d\\n" % os.getpid()).encode())
while True:
    time.sleep(0.05)
"""


def test_named_anonymous_memory(spawn_python, tmp_path, cleanup_pids):
    if not _anon_names_supported():
        pytest.skip("this kernel cannot name anonymous memory (CONFIG_ANON_VMA_NAME is off)")
    w = spawn_python("named", NAMED_SCRIPT)
    priv, shared, crc = w.fields("named")[0]
    priv, shared = int(priv, 16), int(shared, 16)
    paths = {s: path for s, _, _, path in procutil.maps(w.pid)}
    assert paths[priv] == "[anon:pycr private]" and paths[shared] == "[anon_shmem:pycr shared]"
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img")
    cleanup_pids.add(w.pid)
    pycr("restore", "-D", tmp_path / "img", "-d")
    paths = {s: path for s, _, _, path in procutil.maps(w.pid)}
    assert paths[priv] == "[anon:pycr private]"
    for addr in (priv, shared):
        assert "%08x" % zlib.crc32(procutil.read_memory(w.pid, addr, 4 * 4096)) == crc


LATE_ADVICE_SCRIPT = MADVISE_PRELUDE + """SIZE = 1 << 20
# far from every other mapping (MAP_FIXED_NOREPLACE), so that it is a VMA of its own
addr = libc.mmap(0x5e0000000000, SIZE, 3, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x100000, -1, 0)
data = bytes((j * 7) & 0xff for j in range(SIZE))
ctypes.memmove(addr, data, SIZE)
def on_usr2(*a):
    for advice in (10, 18):             # MADV_DONTFORK, MADV_WIPEONFORK: flags only, the maps line stays
        if libc.madvise(addr, SIZE, advice) != 0:
            report("error madvise %d %d" % (advice, ctypes.get_errno()))
    report("advised")
def on_usr1(*a):
    report("sum %08x" % zlib.crc32(ctypes.string_at(addr, SIZE)))
signal.signal(signal.SIGUSR2, on_usr2)
signal.signal(signal.SIGUSR1, on_usr1)
report("region %x %08x" % (addr, zlib.crc32(data)))
report("ready %d" % os.getpid())
while True:
    time.sleep(0.02)
"""


def test_flags_advised_after_the_first_pass_reach_the_replica(spawn_python, cleanup_pids):
    """A migration's final pass copies its pages before the kernel's smaps walk gives the VMAs'
    flags: madvise() between passes changes a VMA's flags and not its maps line, and the
    replica must still have them."""
    from pycr.migrate import migrate
    from pycr.migrate.loop import Policy
    w = spawn_python("late_advice", LATE_ADVICE_SCRIPT)
    addr, crc = w.fields("region")[0]
    addr = int(addr, 16)
    line = [m for m in procutil.maps(w.pid) if m[0] == addr]
    replicas = []

    def between(rep, replica):
        cleanup_pids.add(*replica.reals)
        replicas.append(replica)
        if rep.number == 1:
            w.signal_and_wait(signal.SIGUSR2, r"^advised$")
            assert [m for m in procutil.maps(w.pid) if m[0] == addr] == line, "the maps line must not change"
            assert {"dc", "wf"} <= vmflags_at(w.pid, addr)

    res = migrate(w.pid, policy=Policy(max_passes=3, min_delta=0), on_pass=between)
    assert not [x for x in w.lines() if x.startswith("error")]
    root = res.summary.root_real
    assert {"dc", "wf"} <= vmflags_at(root, addr), vmflags_at(root, addr)
    mark = w.mark()
    procutil.kill(root, signal.SIGUSR1)
    assert w.wait_for(r"^sum \S+$", start=mark, root=False).group(0) == f"sum {crc}"
    procutil.assert_running_untraced(root)
