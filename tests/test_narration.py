"""-vv narrates, as strace would, each syscall pycr injects, each ptrace request and each clone3
with its set_tid; -v does not. The program goes on after each restore."""

import re
import signal

import pytest

from pycrcmd import pycr
from workload_prelude import SLEEPING_CHILD, WORKLOAD_PRELUDE

FORKING_SCRIPT = WORKLOAD_PRELUDE + SLEEPING_CHILD + r"""ticks = []
signal.signal(signal.SIGUSR1, lambda *a: ticks.append(1))
report("ready %d" % os.getpid())
seen = 0
while True:
    if len(ticks) != seen:
        seen = len(ticks)
        report("tick %d child %d" % (seen, child))
    time.sleep(0.01)
"""

NARRATION = re.compile(r"^pycr: (pid \d+( tid \d+)?: [a-z_0-9]+\(.*\) = |ptrace\(PTRACE_|pycr itself: clone3\()", re.M)


def test_vv_narrates_injected_syscalls_ptrace_and_clone3_and_v_does_not(spawn_python, tmp_path, cleanup_pids):
    w = spawn_python("narrated", FORKING_SCRIPT)
    pid = w.pid
    cleanup_pids.add(pid)
    w.signal_and_wait(signal.SIGUSR1, r"^tick 1 child \d+$")

    quiet = pycr("dump", "-v", "-t", pid, "-D", tmp_path / "quiet")
    assert "PTRACE_SEIZE" in quiet.stderr                  # -v still says what it does ...
    assert not NARRATION.search(quiet.stderr), quiet.stderr  # ... but no call by call
    restored = pycr("restore", "-v", "-d", "-D", tmp_path / "quiet")
    assert restored.stderr.strip() and not NARRATION.search(restored.stderr), restored.stderr
    w.signal_and_wait(signal.SIGUSR1, r"^tick 2 child \d+$")

    dump = pycr("dump", "-vv", "-t", pid, "-D", tmp_path / "loud").stderr
    # a sigaction read by an injected call, signal by name, with its result
    assert re.search(rf"^pycr: pid {pid}: rt_sigaction\(SIGUSR1, NULL, 0x[0-9a-f]+, 8\) = 0$", dump, re.M), dump
    assert re.search(rf"^pycr: ptrace\(PTRACE_SEIZE, {pid}, NULL, [A-Z_|]*PTRACE_O_TRACESYSGOOD[A-Z_|]*\) = 0$",
                     dump, re.M), dump
    assert re.search(rf"^pycr: ptrace\(PTRACE_GETREGSET, {pid}, NT_X86_XSTATE, \{{iov_base=0x[0-9a-f]+, "
                     rf"iov_len=\d+\}}\) = 0$", dump, re.M), dump

    restore = pycr("restore", "-vv", "-d", "-D", tmp_path / "loud").stderr
    mmaps = re.findall(r"^pycr: pid \d+: mmap\((0x[0-9a-f]+|NULL), (\d+), (PROT_[A-Z_|]+), (MAP_[A-Z_|]+), "
                       r"(-?\d+), (\d+)\) = (0x[0-9a-f]+)$", restore, re.M)
    assert any("MAP_FIXED" in m[3] and "MAP_ANONYMOUS" in m[3] and m[2] == "PROT_READ|PROT_WRITE"
               for m in mmaps), restore
    assert all(m[0] == m[6] for m in mmaps if "MAP_FIXED" in m[3])   # a fixed mapping lands where asked
    # the root started by pycr with set_tid, its child forked by an injected clone3 with set_tid
    assert re.search(rf"^pycr: pycr itself: clone3\(\{{flags=0, exit_signal=SIGCHLD, set_tid=\[{pid}\], "
                     rf"set_tid_size=1\}}, 88\) = {pid}", restore, re.M), restore
    child = int(w.last("tick 2").split()[-1])
    assert re.search(rf"^pycr: pid {pid}: clone3\(\{{flags=0, exit_signal=SIGCHLD, set_tid=\[{child}\], "
                     rf"set_tid_size=1\}}, 88\) = {child}$", restore, re.M), restore
    assert re.search(rf"^pycr: ptrace\(PTRACE_DETACH, {pid}, NULL, 0\) = 0$", restore, re.M), restore
    w.signal_and_wait(signal.SIGUSR1, rf"^tick 3 child {child}$")


def test_vv_narrates_each_pagemap_scan_of_a_pre_dump(spawn_python, tmp_path, cleanup_pids):
    """A pre-dump's dirty-page tracker walks the pagemap with PAGEMAP_SCAN: a first pass's walks are a line
    each, their range, flags and categories by name and what they found; a later pass's scan of what was
    written is one line per process, over all its tracked VMAs."""
    from pycr.check import check_pagemap_scan
    if not check_pagemap_scan().ok:
        pytest.skip("this kernel has no PAGEMAP_SCAN")
    w = spawn_python("scanned", FORKING_SCRIPT)
    cleanup_pids.add(w.pid)
    first = pycr("pre-dump", "-vv", "-t", w.pid, "-D", tmp_path / "p1").stderr
    scans = re.findall(r"^pycr: ioctl\(/proc/PID/pagemap, PAGEMAP_SCAN, \{start=(0x[0-9a-f]+), end=(0x[0-9a-f]+), "
                       r"flags=([A-Z_|0-9x]+), category_mask=([A-Z_|0-9x]+), .*\}\) = (\d+) regions, (\d+) pages$",
                       first, re.M)
    assert scans, first
    assert all(int(end, 16) > int(start, 16) for start, end, *_ in scans)
    w.signal_and_wait(signal.SIGUSR1, r"^tick 1 child \d+$")
    second = pycr("pre-dump", "-vv", "-t", w.pid, "-D", tmp_path / "p2", "--prev-images-dir", "../p1").stderr
    assert re.search(r"PAGEMAP_SCAN, \{.*flags=PM_SCAN_WP_MATCHING[A-Z_|]*, category_mask=PAGE_IS_WRITTEN, .* = \d+ regions, "
                     r"[1-9]\d* pages$", second, re.M), second
