"""Machine values pycr asks the kernel for instead of hard-coding them, and its settings."""

import ctypes
import mmap
import os

import pytest

from pycrcmd import one_line_error, pycr

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_FIXED_NOREPLACE = 0x100000


def _maps_at(addr):
    got = libc.mmap(addr, mmap.PAGESIZE, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
    if got in (None, ctypes.c_void_p(-1).value):
        return False
    libc.munmap(got, mmap.PAGESIZE)
    return got == addr


def test_page_size_is_the_kernels_everywhere():
    from pycr import sysinfo
    from pycr.native import core
    from pycr.restore import load, memory, mm
    assert sysinfo.page_size() == mmap.PAGESIZE
    assert core.PAGE_SIZE == mm.PAGE == memory.PAGE == load.PAGE == mmap.PAGESIZE


def test_task_size_is_the_last_mappable_page():
    from pycr import sysinfo
    top = sysinfo.task_size()
    assert _maps_at(top - mmap.PAGESIZE)
    assert not _maps_at(top)


def test_mmap_min_addr_from_the_sysctl():
    from pycr import sysinfo
    from pycr.restore.mm import gap, hole_candidates
    with open("/proc/sys/vm/mmap_min_addr") as f:
        floor = max(int(f.read()), mmap.PAGESIZE)
    assert sysinfo.mmap_min_addr() == floor
    # An empty layout: the lowest place for pycr's workspace is just above the floor.
    low = min(hole_candidates([], 1 << 20))
    assert low == (floor + gap() + mmap.PAGESIZE - 1) & ~(mmap.PAGESIZE - 1)
    assert max(hole_candidates([], 1 << 20)) < sysinfo.task_size()


def test_stack_guard_gap_follows_the_boot_parameter():
    from pycr.sysinfo import parse_stack_guard_gap
    assert parse_stack_guard_gap("ro quiet", 4096) == 256 * 4096
    assert parse_stack_guard_gap("ro stack_guard_gap=1024 quiet", 4096) == 1024 * 4096
    assert parse_stack_guard_gap("stack_guard_gap=16", 65536) == 16 * 65536


def test_tty_majors_from_proc_devices():
    from pycr import sysinfo
    assert os.major(os.stat("/dev/tty").st_rdev) in sysinfo.tty_majors()
    assert os.major(os.stat("/dev/null").st_rdev) not in sysinfo.tty_majors()
    text = "Character devices:\n  1 mem\n  4 tty\n 77 ttyXYZ\n204 ttyMAX\nBlock devices:\n  4 tty\n"
    assert sysinfo.parse_char_majors(text, ("ttyMAX",)) == {204}
    assert sysinfo.parse_char_majors(text) == {4, 77, 204}       # block devices are not read


def test_pty_is_a_tty(spawn_python, tmp_path):
    """A pseudo-terminal's slave is recorded as pts and its master as ptmx, whatever their majors."""
    from pycr.images import ImageDir
    w = spawn_python("pty", PTY_SCRIPT)
    fd = int(w.wait_for(r"^pty (\d+)$").group(1))
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img", "-R")
    recs = {r.fd: r for p in ImageDir(tmp_path / "img").read("files").processes for r in p.fds}
    assert str(recs[fd].type) == "pts"
    assert str(recs[fd - 1].type) == "ptmx"
    assert str(recs[0].type) == "chr"      # /dev/null


PTY_SCRIPT = """#!{python}
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
master, slave = os.openpty()
os.write(fd, ("pty %d\\n" % slave).encode())
os.write(fd, ("ready %d\\n" % os.getpid()).encode())
while True:
    time.sleep(0.05)
"""


def test_settings_defaults_and_overrides(monkeypatch):
    from pycr import settings
    assert settings.default_copy_buffer(total=24 << 30, page=4096) == 32 << 20
    assert settings.default_copy_buffer(total=512 << 20, page=4096) == 2 << 20
    assert settings.default_freeze_timeout(load=0.5, cpus=2) == 10.0
    assert settings.default_freeze_timeout(load=8.0, cpus=2) == 40.0
    monkeypatch.setenv("PYCR_COPY_BUFFER", "1000000")
    assert settings.copy_buffer() == 1000000 // mmap.PAGESIZE * mmap.PAGESIZE
    monkeypatch.setenv("PYCR_FREEZE_TIMEOUT", "2.5")
    assert settings.freeze_timeout() == 2.5


@pytest.mark.time_limit(60)
def test_dump_with_a_small_copy_buffer(spawn, tmp_path, cleanup_pids, monkeypatch):
    """A 1-page copy buffer still saves every page (many batches instead of one)."""
    import signal
    w = spawn("bigmem", 8)
    before = w.signal_and_wait(signal.SIGUSR1, r"^sum ([0-9a-f]+)$", timeout=30).group(1)
    monkeypatch.setenv("PYCR_COPY_BUFFER", str(mmap.PAGESIZE))
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img")
    cleanup_pids.add(w.pid)
    pycr("restore", "-D", tmp_path / "img", "-d")
    assert w.signal_and_wait(signal.SIGUSR1, r"^sum ([0-9a-f]+)$", timeout=30).group(1) == before


def test_bad_setting_is_one_line(spawn, tmp_path, monkeypatch):
    w = spawn("counter")
    monkeypatch.setenv("PYCR_FREEZE_TIMEOUT", "soon")
    line = one_line_error(pycr("dump", "-t", w.pid, "-D", tmp_path / "img", expect=1))
    assert "PYCR_FREEZE_TIMEOUT='soon'" in line
    assert w.alive()
