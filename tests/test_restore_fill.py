"""Restored memory read into place by the tasks themselves (injected preadv), through a
pre-dump chain: a tree of two processes with 64 MiB of pseudo-random memory comes back
with the same contents, each process reading its runs from the pages file of the right
pass of the chain."""

import os
import random
import re
import signal

import procutil
from pycrcmd import pycr

PAGE = 4096

TREE_SCRIPT = """#!{python}
import hashlib, mmap, os, random, signal, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
def report(line):
    os.write(fd, (line + "\\n").encode())
SIZE = 32 << 20
def own_region(seed):
    region = mmap.mmap(-1, SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region[:] = random.Random(seed).randbytes(SIZE)
    return region
want = []
signal.signal(signal.SIGUSR1, lambda *_: want.append(1))
region = own_region(1)
child = os.fork()
if child == 0:
    region.close()
    region = own_region(2)
import ctypes
addr = ctypes.addressof(ctypes.c_char.from_buffer(region))
report("region %d %x %d" % (os.getpid(), addr, SIZE))
if child:
    report("child %d" % child)
    report("ready %d" % os.getpid())
while True:
    time.sleep(0.01)
    if want:
        want.clear()
        report("sum %d %s" % (os.getpid(), hashlib.sha256(region).hexdigest()))
"""


def scribble(pid, base, size, count, rng):
    """Overwrite count random pages of [base, base+size) of pid (the next pass saves them)."""
    with open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:
        for _ in range(count):
            mem.seek(base + rng.randrange(size // PAGE) * PAGE)
            mem.write(rng.randbytes(PAGE))


def sums(w, pids):
    """sha256 of each process's region, as the process itself computes it."""
    out = {}
    for pid in pids:
        out[pid] = w.signal_and_wait(signal.SIGUSR1, rf"^sum {pid} ([0-9a-f]+)$", timeout=30, pid=pid).group(1)
    return out


def test_tree_restored_from_a_chain_reads_its_pages_in_place(spawn_python, tmp_path, cleanup_pids):
    w = spawn_python("fill_tree", TREE_SCRIPT)
    child = int(w.wait_for(r"^child (\d+)$").group(1))
    pids = [w.pid, child]
    regions = {}
    for pid in pids:
        m = w.wait_for(rf"^region {pid} ([0-9a-f]+) (\d+)$")
        regions[pid] = (int(m.group(1), 16), int(m.group(2)))
    rng = random.Random(7)
    pycr("pre-dump", "-t", w.pid, "-D", tmp_path / "d1")
    for pid in pids:
        scribble(pid, *regions[pid], 400, rng)
    pycr("pre-dump", "-t", w.pid, "-D", tmp_path / "d2", "--prev-images-dir", "../d1")
    for pid in pids:
        scribble(pid, *regions[pid], 100, rng)
    expected = sums(w, pids)
    pycr("dump", "-t", w.pid, "-D", tmp_path / "d3", "--prev-images-dir", "../d2")
    assert procutil.wait_gone(pids) == []
    cleanup_pids.add(*pids)

    proc = pycr("restore", "-D", tmp_path / "d3", "-d", "-v")
    # Each process read its pages itself, from the files of the passes that hold them.
    for pid in pids:
        m = re.search(rf"pid {pid}: read (\d+) pages into place with \d+ injected preadv batches "
                      rf"from (\d+) pages file", proc.stderr)
        assert m, proc.stderr[-3000:]
        assert int(m.group(1)) >= regions[pid][1] // PAGE and int(m.group(2)) == 3, m.group(0)
    assert sums(w, pids) == expected
    for pid in pids:
        assert procutil.tracer_pid(pid) == 0
    assert os.path.exists(f"/proc/{child}")
