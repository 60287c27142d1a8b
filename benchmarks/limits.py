"""The machine's copy limits: how fast memory can move between processes and to disk.

These are the ceilings a dump or restore can approach, so benchmark figures of pycr and
criu are read against them:
- process_vm_readv of 1 GiB from a sleeping target into a warm, preallocated buffer
  (one 1 GiB iovec, and 2 MiB remote iovecs);
- process_vm_writev of 1 GiB into a populated target, and into a fresh, never touched
  mapping (the restore case, which has to fault in new pages);
- write and fsync of 1 GiB to the image directory's filesystem, to a new file (page cache
  pages allocated fresh), over the same file again (page cache pages reused), and to a
  new file with O_DIRECT (no page cache: how pycr writes pages);
- in-process baselines: memcpy between warm buffers, and the first touch of new anonymous
  memory (slow in this VM: freed memory goes back to the host and comes back page by page).

Run as `python -m benchmarks.limits` or `python benchmarks/limits.py`; prints GiB/s,
medians of a few rounds. `measure()` returns the raw figures for other harnesses.
"""

import argparse
import ctypes
import mmap
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import procs
else:
    from . import procs

GIB = 1 << 30
MIB = 1 << 20
IOV_MAX = 1024


class IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
for _name in ("process_vm_readv", "process_vm_writev"):
    _fn = getattr(_libc, _name)
    _fn.argtypes = [ctypes.c_int, ctypes.POINTER(IoVec), ctypes.c_ulong,
                    ctypes.POINTER(IoVec), ctypes.c_ulong, ctypes.c_ulong]
    _fn.restype = ctypes.c_ssize_t
_libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
_libc.memset.restype = ctypes.c_void_p
_libc.memmove.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_libc.memmove.restype = ctypes.c_void_p


def _addr(buf):
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def _iovecs(base, size, chunk):
    n = (size + chunk - 1) // chunk
    arr = (IoVec * n)()
    for i in range(n):
        arr[i].iov_base = base + i * chunk
        arr[i].iov_len = min(chunk, size - i * chunk)
    return arr


def _vm_copy(fn, pid, local_base, remote_base, size, remote_chunk):
    """Move size bytes with process_vm_readv/writev: one local iovec, remote iovecs of
    remote_chunk bytes, at most IOV_MAX of them per call."""
    remote = _iovecs(remote_base, size, remote_chunk)
    done = 0
    for first in range(0, len(remote), IOV_MAX):
        batch = remote[first:first + IOV_MAX]
        length = sum(v.iov_len for v in batch)
        local = IoVec(local_base + done, length)
        rarr = (IoVec * len(batch))(*batch)
        got = fn(pid, ctypes.byref(local), 1, rarr, len(batch), 0)
        if got != length:
            err = ctypes.get_errno()
            raise OSError(err, f"pid {pid}: {fn.__name__} moved {got} of {length} bytes: {os.strerror(err)}")
        done += got
    return done


def warm_buffer(size):
    """A private anonymous buffer with every page already faulted in."""
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    _libc.memset(_addr(buf), 0x5A, size)
    return buf


def settle(pause, prefault=0):
    """Flush dirty pages and give the VM a moment, so one phase does not bill the next.

    prefault: bytes of anonymous memory to touch and free first. This VM's balloon
    reports freed guest pages to the host a few seconds after they are freed, and the
    first touch of such a page costs a host fault (0.3-0.5 GiB/s instead of 1.5+).
    Touching and freeing about as much as the next phase will allocate, just before it,
    leaves it pages the host still backs, so the phase measures the tool, not the VM.
    """
    os.sync()
    if prefault:
        _first_touch(prefault)
    if pause:
        time.sleep(pause)


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(size=GIB, rounds=5, image_dir=None, pause=0.3, native=True, log=None):
    """Run every measurement `rounds` times; returns {name: [GiB/s per round]}."""
    image_dir = Path(image_dir or procs.CACHE / "images")
    image_dir.mkdir(parents=True, exist_ok=True)
    gib = size / GIB
    res = {}

    def record(name, seconds):
        res.setdefault(name, []).append(gib / seconds)
        if log:
            log(f"  {name}: {gib / seconds:.2f} GiB/s")

    buf = warm_buffer(size)
    other = warm_buffer(size)
    base = _addr(buf)
    core = _native_core() if native else None
    devnull = os.open("/dev/null", os.O_WRONLY)
    target = procs.Workload(size // MIB).start()
    try:
        remote = procs.find_region(target.root, size)
        for r in range(rounds):
            if log:
                log(f"round {r + 1}/{rounds}")
            settle(pause)
            record("memcpy, warm buffers (in-process)",
                   _timed(lambda: _libc.memmove(_addr(other), base, size)))
            settle(pause)
            record("first touch of new anonymous memory (memset)", _timed(lambda: _first_touch(size)))

            for chunk, label in ((size, "1 iovec"), (2 * MIB, "2 MiB iovecs")):
                settle(pause)
                record(f"process_vm_readv, {label}",
                       _timed(lambda: _vm_copy(_libc.process_vm_readv, target.root, base, remote, size, chunk)))
            settle(pause)
            record("process_vm_writev into populated memory, 1 iovec",
                   _timed(lambda: _vm_copy(_libc.process_vm_writev, target.root, base, remote, size, size)))
            with procs.HoleTarget(size) as hole:
                settle(pause)
                record("process_vm_writev into unpopulated memory, 1 iovec",
                       _timed(lambda: _vm_copy(_libc.process_vm_writev, hole.pid, base, hole.addr, size, size)))
            if core is not None:
                runs = _runs(remote, size)
                settle(pause)
                record("pycr.native.core vm_read_runs -> /dev/null",
                       _timed(lambda: core.vm_read_runs(target.root, runs, devnull)))
                settle(pause)
                record("pycr.native.core vm_write_runs into populated memory",
                       _timed(lambda: core.vm_write_runs(target.root, runs, buf, 0)))

            for name, secs in _fs_round(image_dir, buf, pause):
                record(name, secs)
    finally:
        target.cleanup()
        os.close(devnull)
        buf.close()
        other.close()
    return res


def _first_touch(size):
    fresh = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        _libc.memset(_addr(fresh), 0x33, size)
    finally:
        fresh.close()


def _runs(start, size):
    from array import array
    return array("Q", [start, size])


def _native_core():
    """pycr's C core, if it is built; None (and the reason on stderr) if not."""
    try:
        from pycr.native import core
        core.vm_read_runs, core.vm_write_runs  # noqa: B018 - both must exist
        return core
    except Exception as exc:  # noqa: BLE001 - any import problem just means "not measured"
        print(f"limits: pycr.native.core not measured: {exc}", file=sys.stderr)
        return None


def _write_all(fd, buf, chunk=64 * MIB):
    view = memoryview(buf)
    for off in range(0, len(view), chunk):
        part = view[off:off + chunk]
        while part:
            part = part[os.write(fd, part):]


def _fs_round(image_dir, buf, pause):
    """Yield (name, seconds): a new file (fresh page cache), then the same file again."""
    path = image_dir / f"limits-{os.getpid()}.tmp"
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    try:
        settle(pause)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            t0 = time.perf_counter()
            _write_all(fd, buf)
            t1 = time.perf_counter()
            os.fsync(fd)
            t2 = time.perf_counter()
        finally:
            os.close(fd)
        yield "write to a new file (page cache only)", t1 - t0
        yield "write + fsync of a new file", t2 - t0

        settle(pause)
        fd = os.open(path, os.O_WRONLY)
        try:
            t0 = time.perf_counter()
            _write_all(fd, buf)
            os.fsync(fd)
            t1 = time.perf_counter()
        finally:
            os.close(fd)
        yield "write + fsync over the same file (cached pages reused)", t1 - t0

        path.unlink()
        secs = _direct_write(path, buf, pause)
        if secs is not None:
            yield "O_DIRECT write + fsync of a new file (pycr's dump path)", secs
    finally:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _direct_write(path, buf, pause):
    """Seconds to write buf to a new file with O_DIRECT (no page cache), or None if the
    filesystem refuses O_DIRECT. buf is an mmap, so it is page aligned."""
    settle(pause)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    except OSError:
        return None
    try:
        t0 = time.perf_counter()
        _write_all(fd, buf)
        os.fsync(fd)
        return time.perf_counter() - t0
    except OSError:
        return None
    finally:
        os.close(fd)


def summarize(res):
    """{name: (median, min, max)} in GiB/s."""
    return {name: (statistics.median(v), min(v), max(v)) for name, v in res.items()}


def format_table(res, size=GIB):
    lines = [f"{'copy limit (' + _human(size) + ')':<58} {'GiB/s':>7}  {'min-max':>13}"]
    for name, (med, lo, hi) in summarize(res).items():
        lines.append(f"{name:<58} {med:7.2f}  {lo:6.2f}-{hi:<6.2f}")
    return "\n".join(lines)


def _human(n):
    return f"{n / GIB:g} GiB" if n >= GIB else f"{n / MIB:g} MiB"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.limits", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="bytes moved per measurement (default 1024 MiB)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--image-dir", help=f"a directory on the filesystem images go to (default {procs.CACHE}/images)")
    ap.add_argument("--pause", type=float, default=0.3, help="seconds to wait after sync before each phase")
    ap.add_argument("--no-native", action="store_true", help="skip the pycr.native.core measurements")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every round")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("limits: process_vm_readv of another process needs root here", file=sys.stderr)
    size = args.size_mib * MIB
    res = measure(size, args.rounds, args.image_dir, args.pause, native=not args.no_native,
                  log=(lambda s: print(s, file=sys.stderr)) if args.verbose else None)
    print(format_table(res, size))
    print(f"(median of {args.rounds} rounds; image dir {args.image_dir or procs.CACHE / 'images'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
