"""Pages saved through a run that crosses from a readable VMA into a PROT_NONE one."""

import signal
import zlib

import procutil
from pycrcmd import pycr
from workload_prelude import WORKLOAD_PRELUDE

SPLIT_SCRIPT = WORKLOAD_PRELUDE + """import ctypes, mmap, zlib
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
P = mmap.PAGESIZE
addr = libc.mmap(None, 8 * P, 3, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
ctypes.memmove(addr, b"A" * 8 * P, 8 * P)
events = []
signal.signal(signal.SIGUSR1, lambda *a: events.append("write"))
signal.signal(signal.SIGUSR2, lambda *a: events.append("sum"))
report("region %x" % addr)
report("ready %d" % os.getpid())
while True:
    while events:
        what = events.pop(0)
        if what == "write":
            # Every page written, then the upper half closed: one written run, two VMAs.
            ctypes.memmove(addr, bytes(range(256)) * (8 * P // 256), 8 * P)
            libc.mprotect(addr + 4 * P, 4 * P, 0)
            report("changed")
        else:
            libc.mprotect(addr + 4 * P, 4 * P, 3)
            report("sum %08x" % zlib.crc32(ctypes.string_at(addr, 8 * P)))
    time.sleep(0.01)
"""


def test_final_dump_reads_written_pages_in_a_prot_none_neighbour(spawn_python, tmp_path, cleanup_pids):
    import mmap
    w = spawn_python("split", SPLIT_SCRIPT)
    pycr("pre-dump", "-t", w.pid, "-D", tmp_path / "pre")
    w.signal_and_wait(signal.SIGUSR1, r"^changed$")
    addr = int(w.fields("region")[0][0], 16)
    # The written half may merge with a neighbouring anonymous VMA: look up by containment.
    def perms_at(a):
        return next(p for s, e, p, _ in procutil.maps(w.pid) if s <= a < e)
    assert perms_at(addr).startswith("rw") and perms_at(addr + 4 * mmap.PAGESIZE).startswith("---")
    pycr("dump", "-t", w.pid, "-D", tmp_path / "final", "--prev-images-dir", "../pre")
    cleanup_pids.add(w.pid)
    pycr("restore", "-D", tmp_path / "final", "-d")
    want = zlib.crc32(bytes(range(256)) * (8 * mmap.PAGESIZE // 256))
    got = w.signal_and_wait(signal.SIGUSR2, r"^sum ([0-9a-f]+)$").group(1)
    assert int(got, 16) == want


def test_runs_are_cut_at_unreadable_vmas():
    from array import array
    from pycr.collect.memory import split_by_readability
    vmas = [dict(start=0x1000, end=0x5000, prot=3), dict(start=0x5000, end=0x9000, prot=0),
            dict(start=0x9000, end=0xA000, prot=1), dict(start=0xB000, end=0xC000, prot=2)]
    runs = array("Q", [0x1000, 0x9000, 0xB000, 0x1000])
    got = [(r, list(b)) for r, b in split_by_readability(runs, vmas)]
    assert got == [(True, [0x1000, 0x4000]), (False, [0x5000, 0x4000]), (True, [0x9000, 0x1000]),
                   (False, [0xB000, 0x1000])]
