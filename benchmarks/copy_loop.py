"""The dump's copy loop with and without its reads overlapped with its writes.

    python -m benchmarks.copy_loop [--mib 1024] [--rounds 7]

The dump reads a task's pages with process_vm_readv into its copy buffer and
writes them to the pages file with O_DIRECT while a second thread sums them
(pycr.native.core.vm_read_runs). Since the buffer is used in two halves, one
half is read while the other is written. Here the task is this process itself
(MIB of pseudo-random memory), so what is measured is the copy loop and the
device, not ptrace: each run writes a new pages file, fsyncs it and deletes
it. The two ways alternate, order reversed every other round. Prints GiB/s,
median (min-max), and the ratio of the medians.
"""

import argparse
import mmap
import os
import platform
import statistics
import sys
import time
from array import array
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import procs
else:
    from . import procs

from pycr.checksum import PAGES_CHUNK
from pycr.native import core
from pycr.native.core import ChunkSums, Copier
from pycr.settings import copy_buffer

WAYS = [("one batch after the other (before)", 0), ("read overlapped with write (now)", 1)]


def one(mem, path, overlap):
    core.lib.pycr_set_copy_overlap(overlap)
    addr = int(core.ffi.cast("uintptr_t", core.ffi.from_buffer(mem)))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    try:
        os.sync()
        started = time.perf_counter()
        with Copier():
            core.vm_read_runs(os.getpid(), array("Q", [addr, len(mem)]), fd, ChunkSums(PAGES_CHUNK))
        os.fsync(fd)
        return time.perf_counter() - started
    finally:
        os.close(fd)
        os.unlink(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    procs.CACHE.mkdir(parents=True, exist_ok=True)
    print(f"# {platform.system()} {platform.release()}, {os.cpu_count()} CPUs ({cpu}); "
          f"copy buffer {copy_buffer() >> 20} MiB; files in {procs.CACHE}")
    mem = mmap.mmap(-1, args.mib << 20)
    for at in range(0, len(mem), 1 << 20):
        mem[at:at + (1 << 20)] = os.urandom(1 << 20)
    path = str(procs.CACHE / f"copy-loop-{os.getpid()}.img")
    rates = {name: [] for name, _ in WAYS}
    try:
        for r in range(args.rounds):
            for name, overlap in (WAYS if r % 2 == 0 else WAYS[::-1]):
                rates[name].append(len(mem) / one(mem, path, overlap) / 2**30)
    finally:
        core.lib.pycr_set_copy_overlap(1)
    print(f"{args.mib} MiB, {args.rounds} rounds, O_DIRECT write + fsync, GiB/s median (min-max):")
    for name, _ in WAYS:
        v = rates[name]
        print(f"  {name:36s} {statistics.median(v):5.2f} ({min(v):.2f}-{max(v):.2f})")
    before, now = (statistics.median(rates[name]) for name, _ in WAYS)
    print(f"  ratio now / before: {now / before:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
