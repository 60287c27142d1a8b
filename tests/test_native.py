"""The native core against real processes: bulk memory I/O, pagemap, hashing,
raw syscalls, clone3 with chosen PIDs and the restore stub."""

import errno
import importlib
import mmap
import os
import signal
import struct
import subprocess
import time
from array import array

import pytest

import procutil
import pycr
from pycr import abi
from pycr.native import core, stub_path

PAGE = 4096

# A child with a private anonymous area of NPAGES pages, of which only the
# ranges named on the command line ("first:last:step", last exclusive) are
# touched; page i is filled with the 64-bit word pattern(i). It also maps one
# read-only page. It prints both addresses, then serves on stdin:
#   "h I"  -> FNV-1a 64 of page I (area; I = -1 is the read-only page)
WORKLOAD_C = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

static uint64_t fnv(const unsigned char *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) { h ^= p[i]; h *= 0x100000001b3ULL; }
    return h;
}

int main(int argc, char **argv) {
    size_t npages = strtoul(argv[1], NULL, 0);
    unsigned char *area = mmap(NULL, npages * 4096, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned char *ro = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (area == MAP_FAILED || ro == MAP_FAILED) return 2;
    memset(ro, 0x5a, 4096);
    mprotect(ro, 4096, PROT_READ);
    for (int a = 2; a < argc; a++) {
        size_t first, last, step;
        if (sscanf(argv[a], "%zu:%zu:%zu", &first, &last, &step) != 3) return 3;
        for (size_t i = first; i < last; i += step) {
            uint64_t w = i * 0x9E3779B97F4A7C15ULL + 1, *q = (uint64_t *)(area + i * 4096);
            for (int k = 0; k < 512; k++) q[k] = w;
        }
    }
    printf("%lx %lx\n", (unsigned long)area, (unsigned long)ro);
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        long i;
        if (sscanf(line, "h %ld", &i) == 1) {
            printf("%llx\n", (unsigned long long)fnv(i < 0 ? ro : area + i * 4096, 4096));
            fflush(stdout);
        }
    }
    return 0;
}
"""


def pattern(i):
    return struct.pack("<Q", (i * 0x9E3779B97F4A7C15 + 1) & (2**64 - 1)) * (PAGE // 8)


def fnv(data):
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & (2**64 - 1)
    return h


def touched_pages(specs):
    pages = set()
    for first, last, step in specs:
        pages.update(range(first, last, step))
    return sorted(pages)


def as_runs(base, pages):
    """(start, len) runs of the given sorted page indices."""
    runs = array("Q")
    for i in pages:
        addr = base + i * PAGE
        if runs and runs[-2] + runs[-1] == addr:
            runs[-1] += PAGE
        else:
            runs.extend((addr, PAGE))
    return runs


class Child:
    """A running workload process; always killed and reaped by PID."""

    def __init__(self, exe, npages, specs):
        self.specs = specs
        self.proc = subprocess.Popen(
            [exe, str(npages)] + [f"{a}:{b}:{c}" for a, b, c in specs],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        area, ro = self.proc.stdout.readline().split()
        self.base, self.ro = int(area, 16), int(ro, 16)

    def page_hash(self, i):
        self.proc.stdin.write(f"h {i}\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline(), 16)

    def close(self):
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    d = tmp_path_factory.mktemp("native")
    src, exe = d / "mem.c", d / "mem"
    src.write_text(WORKLOAD_C)
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(src)], check=True)
    return str(exe)


@pytest.fixture
def spawn(workload):
    children = []

    def start(npages, specs):
        child = Child(workload, npages, specs)
        children.append(child)
        return child

    yield start
    for child in children:
        child.close()


def reap_pid(pid):
    """Kill and reap a child we made with clone3_exec."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


def free_pid():
    """A PID that is not in use right now (from the top of the range, where
    the kernel's allocator is least likely to get to first)."""
    pid_max = int(open("/proc/sys/kernel/pid_max").read())
    for pid in range(pid_max - 1 - os.getpid() % 1000, 300, -1):
        if not os.path.exists(f"/proc/{pid}"):
            return pid
    pytest.skip("no free PID")


# ---- packaging -------------------------------------------------------------

def test_package_metadata_and_install_location():
    assert pycr.__version__ == "0.1.0"
    formats = importlib.import_module("pycr.formats")  # from the top-level formats/
    # One installation: the formats, the compiled core and the stub all come from the
    # tree pycr was imported from (site-packages, or the checkout and its build dir).
    top = os.path.dirname(os.path.dirname(os.path.realpath(pycr.__file__)))
    for part in (formats.__file__, core.__file__, importlib.import_module("pycr.native._core").__file__,
                 stub_path()):
        assert os.path.realpath(part).startswith(top + os.sep), part
    assert os.access(stub_path(), os.X_OK)
    expect = os.environ.get("PYCR_EXPECT_INSTALLED")
    if expect:  # scripts/test.sh: the suite must test the installed copy, not the checkout
        assert os.path.realpath(pycr.__file__).startswith(os.path.realpath(expect))


# ---- bulk memory I/O -------------------------------------------------------

# More runs than one batch of iovecs, and a run larger than the bounce buffer.
BIG_SPECS = [(0, 6000, 3), (1, 6000, 3), (8000, 17000, 1)]


def test_vm_read_runs_copies_exactly_the_runs(spawn, tmp_path):
    child = spawn(17000, BIG_SPECS)
    pages = touched_pages(child.specs)
    runs = as_runs(child.base, pages)
    assert len(runs) // 2 > 1024
    out = tmp_path / "pages.img"
    with open(out, "wb") as f:
        written = core.vm_read_runs(child.pid, runs, f.fileno())
    assert written == len(pages) * PAGE == out.stat().st_size
    with open(out, "rb") as f:
        for i in pages:
            assert f.read(PAGE) == pattern(i), f"page {i}"


@pytest.mark.parametrize("buffer_pages", [1, 2, 3, 64])
def test_vm_read_runs_through_a_small_buffer_in_halves_keeps_order_and_sums(spawn, tmp_path, buffer_pages):
    """The copy loop reads one half of its buffer while the other is written: with a
    buffer of 1 page (no halves), 2, 3 (odd) and 64 pages, the file holds the runs in
    order and the sums are those of the file."""
    child = spawn(17000, BIG_SPECS)
    pages = touched_pages(child.specs)
    runs = as_runs(child.base, pages)
    out = tmp_path / "pages.img"
    sums = core.ChunkSums(5 * PAGE)
    with open(out, "wb") as f, core.Copier(buffer_pages * PAGE):
        written = core.vm_read_runs(child.pid, runs, f.fileno(), sums)
    data = out.read_bytes()
    assert written == len(pages) * PAGE == len(data)
    assert all(data[k * PAGE:(k + 1) * PAGE] == pattern(i) for k, i in enumerate(pages))
    assert list(sums.sums()) == [core.crc32c(data[at:at + 5 * PAGE]) for at in range(0, len(data), 5 * PAGE)]


def test_vm_read_runs_names_unreadable_address(spawn, tmp_path):
    child = spawn(4, [(0, 4, 1)])
    hole = 0x10000  # below mmap_min_addr: never mapped
    runs = array("Q", [child.base, PAGE, hole, PAGE])
    with open(tmp_path / "p", "wb") as f, pytest.raises(OSError) as exc:
        core.vm_read_runs(child.pid, runs, f.fileno())
    assert exc.value.errno == errno.EFAULT
    assert hex(hole) in str(exc.value)


def test_vm_write_runs_changes_child_memory(spawn, tmp_path):
    child = spawn(64, [(0, 64, 1)])
    targets = [3, 4, 5, 10, 40, 63]
    runs = as_runs(child.base, targets)
    data = b"".join(bytes([i]) * PAGE for i in targets)
    path = tmp_path / "src"
    path.write_bytes(b"\xee" * PAGE + data)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert core.vm_write_runs(child.pid, runs, m, src_offset=PAGE) == len(data)
    for i in targets:
        assert child.page_hash(i) == fnv(bytes([i]) * PAGE)
    assert child.page_hash(2) == fnv(pattern(2))  # untouched neighbour
    with pytest.raises(ValueError):
        core.vm_write_runs(child.pid, runs, data, src_offset=1)


def test_vm_read_and_write_single(spawn):
    child = spawn(2, [(0, 2, 1)])
    assert core.vm_read(child.pid, child.base + PAGE, PAGE) == pattern(1)
    assert core.vm_write(child.pid, child.base + 8, b"hello") == 5
    assert core.vm_read(child.pid, child.base, 16) == pattern(0)[:8] + b"hello" + pattern(0)[13:16]


def test_read_only_mapping_needs_mem_write(spawn):
    child = spawn(1, [])
    with pytest.raises(OSError) as exc:
        core.vm_write(child.pid, child.ro, b"x")
    assert exc.value.errno == errno.EFAULT
    assert core.mem_write(child.pid, child.ro, b"\x01" * PAGE) == PAGE
    assert child.page_hash(-1) == fnv(b"\x01" * PAGE)


def test_vm_read_of_gone_task_raises_esrch(workload):
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(OSError) as exc:
        core.vm_read(proc.pid, 0x400000, 8)
    assert exc.value.errno == errno.ESRCH


# ---- pagemap ---------------------------------------------------------------

def test_pagemap_runs_finds_exactly_the_touched_pages(spawn):
    specs = [(0, 1, 1), (5, 9, 1), (20, 200, 7), (300, 512, 1)]
    child = spawn(512, specs)
    expected = as_runs(child.base, touched_pages(specs))
    end = child.base + 512 * PAGE
    with open(f"/proc/{child.pid}/pagemap", "rb") as pm:
        assert core.pagemap_runs(pm.fileno(), child.base, end) == expected
        assert core.pagemap_runs(pm.fileno(), child.base, end, anon_only=True) == expected
        assert core.pagemap_runs(pm.fileno(), child.base, end, want_present=False) == array("Q")


def test_pagemap_runs_anon_only_skips_file_pages(spawn):
    child = spawn(1, [])
    with open(f"/proc/{child.pid}/maps") as f:
        text = next(line for line in f if " r-xp " in line and "/mem" in line)
    start, end = (int(x, 16) for x in text.split()[0].split("-"))
    with open(f"/proc/{child.pid}/pagemap", "rb") as pm:
        assert len(core.pagemap_runs(pm.fileno(), start, end)) > 0
        assert len(core.pagemap_runs(pm.fileno(), start, end, anon_only=True)) == 0


def test_pagemap_runs_merges_across_output_batches(spawn, monkeypatch):
    specs = [(0, 4, 2), (4, 12, 1)]
    child = spawn(12, specs)
    monkeypatch.setattr(core, "_RUNS_PER_CALL", 1)
    with open(f"/proc/{child.pid}/pagemap", "rb") as pm:
        got = core.pagemap_runs(pm.fileno(), child.base, child.base + 12 * PAGE)
    assert got == as_runs(child.base, touched_pages(specs))


def test_pagemap_scan_reports_present_pages(spawn):
    specs = [(2, 3, 1), (10, 30, 1), (40, 64, 3)]
    child = spawn(64, specs)
    end = child.base + 64 * PAGE
    runs = as_runs(child.base, touched_pages(specs))
    expected = array("Q")
    for k in range(0, len(runs), 2):
        expected.extend((runs[k], runs[k] + runs[k + 1], abi.PAGE_IS_PRESENT))
    with open(f"/proc/{child.pid}/pagemap", "rb") as pm:
        got, walk_end = core.pagemap_scan(pm.fileno(), child.base, end, 0,
                                          abi.PAGE_IS_PRESENT, 0, 0,
                                          abi.PAGE_IS_PRESENT)
        assert walk_end == end
        assert got == expected
        one, walk_end = core.pagemap_scan(pm.fileno(), child.base, end, 0,
                                          abi.PAGE_IS_PRESENT, 0, 0,
                                          abi.PAGE_IS_PRESENT, max_pages=1)
        assert list(one) == [child.base + 2 * PAGE, child.base + 3 * PAGE, abi.PAGE_IS_PRESENT]
        assert walk_end <= child.base + 10 * PAGE


def test_pagemap_scan_loops_when_vec_fills(spawn, monkeypatch):
    specs = [(0, 32, 2)]
    child = spawn(32, specs)
    monkeypatch.setattr(core, "_RUNS_PER_CALL", 3)
    end = child.base + 32 * PAGE
    with open(f"/proc/{child.pid}/pagemap", "rb") as pm:
        got, walk_end = core.pagemap_scan(pm.fileno(), child.base, end, 0,
                                          abi.PAGE_IS_PRESENT, 0, 0,
                                          abi.PAGE_IS_PRESENT)
    assert walk_end == end
    assert list(got[0::3]) == [child.base + i * PAGE for i in range(0, 32, 2)]


# ---- hashing ---------------------------------------------------------------

def test_hash_pages_equal_iff_content_equal():
    base = bytes(range(256)) * 16
    flipped = bytearray(base)
    flipped[4095] ^= 0x80
    buf = base + bytes(flipped) + base + bytes(PAGE)
    h = core.hash_pages(buf, 4)
    assert len(h) == 4 and h[0] == h[2]
    assert len({h[0], h[1], h[3]}) == 3
    with pytest.raises(ValueError):
        core.hash_pages(buf, 5)


def test_hash_pages_single_bit_flips_all_differ():
    page = bytearray(PAGE)
    variants = [bytes(page)]
    for bit in range(0, PAGE * 8, 13):
        v = bytearray(page)
        v[bit // 8] ^= 1 << (bit % 8)
        variants.append(bytes(v))
    h = core.hash_pages(b"".join(variants), len(variants))
    assert len(set(h)) == len(variants)


# ---- syscalls, pidfds, kcmp, tee ---------------------------------------------

def test_syscall_returns_result_or_raises():
    assert core.syscall(39) == os.getpid()  # getpid
    with pytest.raises(OSError) as exc:
        core.syscall(62, 2**22 + 12345, 0)  # kill(no such pid, 0)
    assert exc.value.errno == errno.ESRCH


def test_pidfd_getfd_kcmp_and_signal(spawn):
    child = spawn(1, [])
    pidfd = core.pidfd_open(child.pid)
    try:
        # The child's stdin is our pipe's read end: same open file description.
        theirs = core.pidfd_getfd(pidfd, 0)
        try:
            assert core.kcmp(child.pid, os.getpid(), abi.KCMP_FILE, 0, theirs) == 0
            assert core.kcmp(child.pid, os.getpid(), abi.KCMP_FILE, 1, theirs) != 0
            assert core.kcmp(child.pid, os.getpid(), abi.KCMP_VM) != 0
        finally:
            os.close(theirs)
        core.pidfd_send_signal(pidfd, signal.SIGKILL)
        assert child.proc.wait(timeout=5) == -signal.SIGKILL
    finally:
        os.close(pidfd)


def test_tee_duplicates_without_consuming():
    a_r, a_w = os.pipe()
    b_r, b_w = os.pipe()
    try:
        os.write(a_w, b"buffered")
        assert core.tee(a_r, b_w, 1024) == 8
        assert os.read(b_r, 100) == b"buffered"
        assert os.read(a_r, 100) == b"buffered"
    finally:
        for fd in (a_r, a_w, b_r, b_w):
            os.close(fd)


# ---- clone3 and the stub ---------------------------------------------------

def test_clone3_exec_gets_requested_pid_and_runs_stub():
    want = free_pid()
    pid = core.clone3_exec([want], 0, stub_path(), ["pycr-stub"])
    try:
        assert pid == want
        assert procutil.wait_until(lambda: os.readlink(f"/proc/{pid}/exe") == os.path.realpath(stub_path()))
        assert procutil.wait_until(lambda: open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "S")
        with open(f"/proc/{pid}/maps") as f:
            text = [line.split() for line in f if "pycr-stub" in line]
        assert [t for t in text if t[1] == "r-xp"], text
        start, end = (int(x, 16) for x in text[0][0].split("-"))
        assert start >= 0x200000000
        code = core.vm_read(pid, start, end - start)
        assert b"\x0f\x05\xcc" in code  # the injection trampoline
    finally:
        reap_pid(pid)


def test_clone3_exec_taken_pid_is_eexist():
    with pytest.raises(OSError) as exc:
        core.clone3_exec([os.getpid()], 0, stub_path(), ["pycr-stub"])
    assert exc.value.errno == errno.EEXIST


def test_clone3_exec_failed_exec_exits_127():
    pid = core.clone3_exec([], 0, "/nonexistent/pycr", ["x"])
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 127


def test_stub_init_is_pid1_of_new_namespace_and_reaps():
    want = free_pid()
    pid = core.clone3_exec([1, want], abi.CLONE_NEWPID, stub_path(), ["pycr-stub", "init"])
    try:
        assert pid == want
        def nspid():
            with open(f"/proc/{pid}/status") as f:
                return next(l.split()[1:] for l in f if l.startswith("NSpid:"))
        assert procutil.wait_until(lambda: nspid() == [str(want), "1"], 5)
        assert procutil.wait_until(lambda: os.readlink(f"/proc/{pid}/exe") == os.path.realpath(stub_path()), 5)
        # It waits in wait4 or its short nap, never spins.
        with open(f"/proc/{pid}/stat") as f:
            utime = int(f.read().rsplit(")", 1)[1].split()[11])
        # Kept: CPU time over a stretch of wall time is what is measured; there is no
        # event. A spinning stub would use all 30 ticks of it, a napping one about none.
        time.sleep(0.3)
        with open(f"/proc/{pid}/stat") as f:
            assert int(f.read().rsplit(")", 1)[1].split()[11]) - utime < 10
    finally:
        reap_pid(pid)


def test_copier_is_sized_by_what_a_dump_will_copy_before_its_first_use(spawn, tmp_path):
    """A small dump prefaults a small buffer: expect() sizes the buffer before it is mapped
    (a quarter of the bytes, at least 1 MiB, never above the configured size), not after;
    and the copy through it is whole."""
    child = spawn(64, [(0, 64, 1)])
    runs = as_runs(child.base, list(range(64)))
    with core.Copier(32 << 20) as copier:
        copier.expect(2 << 20)
        assert copier.size == 1 << 20
        copier.expect(1 << 30)
        assert copier.size == 1 << 20
        with open(tmp_path / "p", "wb") as f:
            assert core.vm_read_runs(child.pid, runs, f.fileno()) == 64 * PAGE
        copier.expect(1 << 30)                          # mapped now: stays as it is
        assert copier.size == 1 << 20
    with core.Copier(32 << 20) as big:
        big.expect(1 << 34)
        assert big.size == 32 << 20
    with pytest.raises(ValueError):
        big.sum_fd(core.ChunkSums(PAGE), os.open(tmp_path / "p", os.O_RDONLY), 0, PAGE)
    assert (tmp_path / "p").read_bytes() == b"".join(pattern(i) for i in range(64))


MIXED_PAGES = """import ctypes, mmap, os, sys, tempfile, time
P = mmap.PAGESIZE
anon = mmap.mmap(-1, 64 * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in (0, 1, 2, 10, 11, 40):
    anon[i * P] = 1                      # written: anonymous pages
for i in (20, 21, 30):
    anon[i * P]                          # read only: the shared zero page
shared = mmap.mmap(-1, 16 * P, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
for i in (0, 3, 4):
    shared[i * P] = 1                    # shmem: a file page, not anonymous
f = tempfile.TemporaryFile()
f.write(bytes(16 * P)); f.flush()
private = mmap.mmap(f.fileno(), 16 * P, flags=mmap.MAP_PRIVATE)
for i in (0, 1, 5):
    private[i * P]                       # read: the page cache's pages
for i in (1, 8):
    private[i * P] = 2                   # written: private (COW) copies
addr = lambda m: ctypes.addressof(ctypes.c_char.from_buffer(m))
print("%x %x %x" % (addr(anon), addr(shared), addr(private)), flush=True)
sys.stdin.read()
"""


def test_pagemap_runs_by_scan_and_by_entries_agree(monkeypatch):
    """PAGEMAP_SCAN and the pagemap entries answer the same question the same way: written
    and zero-page anonymous pages, shmem and page-cache pages (left out with anon_only), and
    a private file mapping's COW copies (kept)."""
    import sys
    child = subprocess.Popen([sys.executable, "-c", MIXED_PAGES], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        anon, shared, private = (int(x, 16) for x in child.stdout.readline().split())
        _compare_routes(child.pid, anon, shared, private, monkeypatch)
    finally:
        child.kill()
        child.wait()


def _compare_routes(pid, anon, shared, private, monkeypatch):
    page = core.PAGE_SIZE

    def runs_of(pages, base):
        return as_runs(base, sorted(pages))

    cases = [
        (anon, 64, False, runs_of({0, 1, 2, 10, 11, 40, 20, 21, 30}, anon)),
        (anon, 64, True, runs_of({0, 1, 2, 10, 11, 40, 20, 21, 30}, anon)),
        (shared, 16, False, runs_of({0, 3, 4}, shared)),
        (shared, 16, True, array("Q")),
        (private, 16, False, None),      # the page cache's pages: fault-around maps more than was read
        (private, 16, True, runs_of({1, 8}, private)),
    ]
    with open(f"/proc/{pid}/pagemap", "rb") as pm:
        for base, npages, anon_only, expected in cases:
            got = {}
            for route in ("scan", "entries"):
                monkeypatch.setattr(core, "_scan_for_runs", route == "scan")
                got[route] = core.pagemap_runs(pm.fileno(), base, base + npages * page, anon_only=anon_only)
            assert got["scan"] == got["entries"], (hex(base), anon_only)
            if expected is not None:
                assert got["scan"] == expected, (hex(base), anon_only)
            else:
                pages = {(a - base) // page + k for a, n in zip(got["scan"][::2], got["scan"][1::2])
                         for k in range(n // page)}
                assert {0, 1, 5, 8} <= pages
