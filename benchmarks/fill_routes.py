"""Routes for filling a stopped task's unpopulated memory from a pages file, side by side.

    python -m benchmarks.fill_routes [--size-mib 1024] [--rounds 5] [--run-pages 64]

As root. A pages file of SIZE pseudo-random bytes (kept in the cache dir between runs)
is read into a stopped stub (benchmarks.procs.HoleTarget: a mapping never touched), laid
out as a pagemap of runs of RUN_PAGES pages with a one-page hole after each (so that
every run is one iovec), by each route:
- pread+vm_writev: pycr's route before in-task reads (pycr.restore.memory.stream_pages):
  O_DIRECT preads into pycr's buffers overlapped with process_vm_writev into the task;
- in-task preadv O_DIRECT: the task takes pycr's fd of the file with pidfd_getfd and
  runs preadv itself, up to IOV_MAX runs per call (pycr.restore.infill.TaskReader);
- in-task preadv, page cache warm: the same without O_DIRECT, the file read once
  just before (what it costs when a check already brought the pages into the cache);
- in-task preadv, buffered, cold: without O_DIRECT, the file dropped from the cache;
- process_vm_writev into unpopulated memory from a warm buffer, 1 iovec: the limit
  the goals are measured against (as benchmarks.limits measures it).
The routes are interleaved within each round (the machine is shared); the table shows
medians, min-max, and each median's ratio to the process_vm_writev limit. userfaultfd
UFFDIO_COPY is not measured: it copies from pycr's buffer too, as process_vm_writev does.
Every process started is killed by PID and reaped.
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

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import limits, procs
else:
    from . import limits, procs

from pycr.abi import MAP_ANONYMOUS, MAP_PRIVATE, PROT_EXEC, PROT_READ, PROT_WRITE
from pycr.ptrace.inject import Injector
from pycr.ptrace.thread import Thread
from pycr.restore import infill
from pycr.restore.memory import stream_buffers, stream_pages
from pycr.restore.remote import Remote

GIB, MIB, PAGE = 1 << 30, 1 << 20, os.sysconf("SC_PAGE_SIZE")
WORKSPACE = 32 * PAGE
LIMIT = "process_vm_writev into unpopulated memory, 1 iovec"


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def pages_file(size):
    """A pages file of size pseudo-random bytes in the cache dir (made once)."""
    path = procs.CACHE / "images" / f"fill-routes-{size >> 20}m.img"
    if path.exists() and path.stat().st_size == size:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    block = bytearray(os.urandom(16 * MIB))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        for i in range(0, size, len(block)):
            block[:8] = i.to_bytes(8, "little")         # no two blocks alike
            f.write(block[:min(len(block), size - i)])
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def layout(size, run_pages):
    """(runs as addr offsets from 0, span): runs of run_pages pages, a page apart."""
    run = run_pages * PAGE
    runs = array("Q")
    for i in range(size // run):
        runs.extend((i * (run + PAGE), run))
    if size % run:
        runs.extend(((size // run) * (run + PAGE), size % run))
    return runs, runs[-2] + runs[-1]


def placed(runs, base):
    out = array("Q", runs)
    out[0::2] = array("Q", (a + base for a in runs[0::2]))
    return out


def drop_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm_cache(path):
    with open(path, "rb") as f:
        while f.read(64 * MIB):
            pass


class StoppedStub:
    """A HoleTarget seized and stopped, with a workspace (trampoline + scratch) and
    a pidfd of this process, as a restore stub has them."""

    def __init__(self, span):
        self.hole = procs.HoleTarget(span)
        self.thread = Thread(self.hole.pid)
        self.thread.seize()
        self.thread.interrupt()
        self.thread.wait(5)
        inj = Injector(self.thread)
        try:
            ws = inj.check("mmap", 0, WORKSPACE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
            inj.write(ws, b"\x0f\x05\xcc")
            inj.check("mprotect", ws, PAGE, PROT_READ | PROT_EXEC)
            self.pidfd = inj.check("pidfd_open", os.getpid(), 0)
        finally:
            inj.restore()
        self.remote = Remote(self.thread, self.hole.pid, self.hole.pid, ws)
        self.remote.use_scratch(ws + PAGE, WORKSPACE - PAGE)

    def close(self):
        self.hole.close()       # SIGKILL and reap: its memory goes with it


def route_stream(path, runs, span, buffers):
    with procs.HoleTarget(span) as hole:
        fd = infill.open_pages(path)
        try:
            t0 = time.perf_counter()
            stream_pages(hole.pid, fd, 0, placed(runs, hole.addr), buffers)
            return time.perf_counter() - t0
        finally:
            os.close(fd)


def route_in_task(path, runs, span, direct):
    stub = StoppedStub(span)
    try:
        t0 = time.perf_counter()
        reader = infill.TaskReader(stub.remote, stub.pidfd, path, direct=direct)
        try:
            reader.read(placed(runs, stub.hole.addr), 0)
        finally:
            reader.close()
        return time.perf_counter() - t0
    finally:
        stub.close()


def route_limit(buf, size):
    with procs.HoleTarget(size) as hole:
        t0 = time.perf_counter()
        limits._vm_copy(limits._libc.process_vm_writev, hole.pid, limits._addr(buf), hole.addr, size, size)
        return time.perf_counter() - t0


def measure(size, rounds, run_pages, pause, log=None):
    path = pages_file(size)
    runs, span = layout(size, run_pages)
    buffers = stream_buffers()
    buf = limits.warm_buffer(size)
    cold = lambda: drop_cache(path)
    # (prepare, route): the page cache is prepared before the settle, so that the
    # memory settle prefaults is left for the route to allocate
    routes = {
        "pread+vm_writev (O_DIRECT, overlapped)": (cold, lambda: route_stream(path, runs, span, buffers)),
        "in-task preadv, O_DIRECT": (cold, lambda: route_in_task(path, runs, span, True)),
        "in-task preadv, page cache warm": (lambda: warm_cache(path),
                                            lambda: route_in_task(path, runs, span, False)),
        "in-task preadv, buffered, cold": (cold, lambda: route_in_task(path, runs, span, False)),
        LIMIT: (lambda: None, lambda: route_limit(buf, size)),
    }
    res = {name: [] for name in routes}
    try:
        for r in range(rounds):
            order = list(routes)
            if r % 2:
                order.reverse()             # no route always runs right after the same one
            for name in order:
                prepare, route = routes[name]
                prepare()
                limits.settle(pause, prefault=size)
                secs = route()
                res[name].append(size / GIB / secs)
                if log:
                    log(f"round {r + 1}: {name}: {size / GIB / secs:.2f} GiB/s")
    finally:
        for b in buffers:
            b.close()
        buf.close()
        drop_cache(path)
    return res


def format_table(res, size, rounds, run_pages):
    limit = statistics.median(res[LIMIT])
    lines = [f"fill {size >> 20} MiB of unpopulated memory, runs of {run_pages} pages, "
             f"median of {rounds} rounds, {cpu_model()}, Linux {platform.release()}",
             f"{'route':<48} {'GiB/s':>6}  {'min-max':>11}  {'/ limit':>7}"]
    for name, v in res.items():
        med = statistics.median(v)
        lines.append(f"{name:<48} {med:6.2f}  {min(v):5.2f}-{max(v):<5.2f}  {med / limit:7.2f}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fill_routes", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--run-pages", type=int, default=64, help="pages per pagemap run (default 64)")
    ap.add_argument("--pause", type=float, default=0.3, help="seconds to wait after sync before each route")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("fill_routes: needs root (ptrace, process_vm_writev)", file=sys.stderr)
        return 1
    size = args.size_mib * MIB
    res = measure(size, args.rounds, args.run_pages, args.pause,
                  log=(lambda s: print(s, file=sys.stderr, flush=True)) if args.verbose else None)
    print(format_table(res, size, args.rounds, args.run_pages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
