"""How fast a restore's check reads pages files, by threads and read size.

    python -m benchmarks.verify_reads [--files 1x2048,16x32] [--rounds 5]

Before a restore creates anything it reads every pages file of the set once
(O_DIRECT) and checks its CRC-32C sums (pycr.checksum.sums_of_files). This
writes pseudo-random pages files (kept in the cache dir between runs), then
reads them with each configuration in turn: one thread reading the whole copy
buffer at a time (the route before), and 1, 2 or 4 threads reading pieces of
a few MiB. Configurations alternate within each round, order reversed every
other round; each read is preceded by a sync. Prints GiB/s, median (min-max),
and the device's own sequential O_DIRECT read (one 8 MiB read at a time) of
the same bytes measured in the same rounds.
"""

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import procs
else:
    from . import procs

from pycr import checksum
from pycr.settings import copy_buffer


def make_files(spec):
    """'16x32' -> 16 files of 32 MiB under the cache dir (made once) -> [paths]."""
    count, mib = (int(x) for x in spec.split("x"))
    where = procs.CACHE / "verify-reads" / spec
    where.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = where / f"pages-{i}.img"
        if not path.exists() or path.stat().st_size != mib << 20:
            with open(path, "wb") as f:
                for _ in range(mib):
                    f.write(os.urandom(1 << 20))
                os.fsync(f.fileno())
        paths.append(str(path))
    return paths


def device_read(paths, block=8 << 20):
    """Plain O_DIRECT reads of every file, one block at a time (what dd iflag=direct does)."""
    import mmap
    buf = mmap.mmap(-1, block)
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            while os.readv(fd, [buf]) > 0:
                pass
        finally:
            os.close(fd)
    buf.close()


def configurations():
    before = copy_buffer()
    return [
        (f"1 thread, {before >> 20} MiB reads (before)", dict(threads=1, read=before)),
        ("1 thread, 2 MiB reads", dict(threads=1, read=2 << 20)),
        ("2 threads, 2 MiB reads", dict(threads=2, read=2 << 20)),
        ("4 threads, 2 MiB reads (now)", dict(threads=4, read=2 << 20)),
        ("4 threads, 8 MiB reads", dict(threads=4, read=8 << 20)),
    ]


def timed(fn):
    os.sync()
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def run_config(paths, threads, read):
    saved = checksum.VERIFY_READ
    checksum.VERIFY_READ = read
    checksum._buffers.__dict__.clear()
    try:
        return timed(lambda: checksum.sums_of_files(paths, threads=threads))
    finally:
        checksum.VERIFY_READ = saved
        checksum._buffers.__dict__.clear()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", default="1x2048,16x32", help="COUNTxMIB[,COUNTxMIB...]")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    print(f"# {platform.system()} {platform.release()}, {os.cpu_count()} CPUs ({cpu}); files in {procs.CACHE}")
    for spec in args.files.split(","):
        paths = make_files(spec)
        size = sum(os.path.getsize(p) for p in paths)
        configs = configurations() + [("device: 8 MiB O_DIRECT reads, no sums", None)]
        rates = {name: [] for name, _ in configs}
        for r in range(args.rounds):
            order = configs if r % 2 == 0 else configs[::-1]
            for name, cfg in order:
                dt = timed(lambda: device_read(paths)) if cfg is None else run_config(paths, **cfg)
                rates[name].append(size / dt / 2**30)
        print(f"\n{spec} MiB ({size >> 20} MiB), {args.rounds} rounds, GiB/s median (min-max):")
        device = statistics.median(rates[configs[-1][0]])
        for name, _ in configs:
            v = rates[name]
            print(f"  {name:42s} {statistics.median(v):5.2f} ({min(v):.2f}-{max(v):.2f})"
                  f"  {statistics.median(v) / device:4.2f} of the device")
    return 0


if __name__ == "__main__":
    sys.exit(main())
