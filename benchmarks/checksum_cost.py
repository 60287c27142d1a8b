"""What the pages checksums cost: a 2 GiB dump with and without them, and the check at restore.

    python -m benchmarks.checksum_cost [--mib 2048] [--rounds 3] [--json FILE]

As root. Each round starts tests/workloads/bigmem (MIB of random memory), and dumps it
in-process with pycr.dump.dump_tree, alternating between checksums on (as shipped) and
off. Off exists only here: the pages writer is handed a counter that takes the bytes
without summing them (the C copy loop then skips the CRC); such a set is not restorable.
Also timed: CRC-32C alone over MIB of memory (ChunkSums, as the dump feeds it), and at
restore manifest.verify(deep=True) (reads every pages file once) against the whole
restore of the same set. Everything started is killed by PID and reaped.
"""

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from pycr import checksum, images, manifest
from pycr.dump import dump_tree
from pycr.native import core
from pycr.native.core import ffi
from pycr.restore.restorer import restore

REPO = Path(__file__).resolve().parent.parent


class NoSums:
    """Stands in for ChunkSums: counts the bytes, sums nothing (measurement only)."""

    def __init__(self, chunk=checksum.PAGES_CHUNK):
        self.pos = 0

    def reserve(self, nbytes):
        self.pos += nbytes      # vm_read_runs writes exactly the bytes of its runs
        return ffi.NULL

    def update(self, data):
        self.pos += len(memoryview(data).cast("B"))

    def mark(self):
        return self.pos

    def rewind(self, mark):
        self.pos = mark

    def sums(self):
        from array import array
        return array("I")


@contextlib.contextmanager
def checksums(on):
    if on:
        yield
        return
    saved = checksum.PagesFile.__init__

    def init(self, f, chunk=checksum.PAGES_CHUNK):
        self._f, self.sums = f, NoSums()
    checksum.PagesFile.__init__ = init
    try:
        yield
    finally:
        checksum.PagesFile.__init__ = saved


def start_bigmem(exe, work, mib):
    status = work / "status"
    status.write_text("")
    proc = subprocess.Popen([exe, str(status), str(mib)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while "ready" not in status.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("checksum_cost: bigmem did not start")
        time.sleep(0.05)
    return proc


def reap(proc):
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def settle():
    """Flush dirty pages so that one round's writeback does not land in the next."""
    os.sync()
    time.sleep(0.5)


def crc_alone(mib):
    buf = bytearray(os.urandom(1 << 20)) * mib
    sums = core.ChunkSums(checksum.PAGES_CHUNK)
    t = time.perf_counter()
    sums.update(buf)
    return time.perf_counter() - t


def run(args):
    work = Path(tempfile.mkdtemp(prefix="pycr-cksum-", dir=args.dir))
    exe = work / "bigmem"
    src = REPO / "tests" / "workloads"
    subprocess.run(["gcc", "-O2", "-I", str(src), "-o", str(exe), str(src / "bigmem.c")], check=True)
    result = {"mib": args.mib, "rounds": args.rounds, "dump_on_s": [], "dump_off_s": [], "verify_s": [],
              "restore_s": []}
    try:
        for r in range(args.rounds):
            for on in ((True, False) if r % 2 == 0 else (False, True)):
                proc = start_bigmem(str(exe), work, args.mib)
                img = work / "img"
                try:
                    settle()
                    with checksums(on):
                        t = time.monotonic()
                        dump_tree(proc.pid, str(img))
                        took = time.monotonic() - t
                finally:
                    reap(proc)
                result["dump_on_s" if on else "dump_off_s"].append(took)
                print(f"round {r + 1}: dump {'with' if on else 'without'} checksums: {took:.3f} s", flush=True)
                if on:
                    settle()
                    t = time.monotonic()
                    manifest.verify(img, deep=True)
                    result["verify_s"].append(time.monotonic() - t)
                    settle()
                    t = time.monotonic()
                    restore(str(img), detach=True)
                    result["restore_s"].append(time.monotonic() - t)
                    pid = images.ImageDir(img).read("inventory").root_pid
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, 0)
                    while os.path.exists(f"/proc/{pid}"):
                        time.sleep(0.01)
                    print(f"round {r + 1}: verify {result['verify_s'][-1]:.3f} s of a restore "
                          f"{result['restore_s'][-1]:.3f} s", flush=True)
                shutil.rmtree(img)
        result["crc_alone_s"] = min(crc_alone(args.mib) for _ in range(3))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    on, off = statistics.median(result["dump_on_s"]), statistics.median(result["dump_off_s"])
    result["ratio_on_off"] = on / off
    print(f"dump of {args.mib} MiB, median of {args.rounds}: with checksums {on:.3f} s, without {off:.3f} s, "
          f"ratio {on / off:.3f}")
    print(f"CRC-32C alone over {args.mib} MiB: {result['crc_alone_s']:.3f} s "
          f"({args.mib / 1024 / result['crc_alone_s']:.1f} GiB/s), {result['crc_alone_s'] / off:.3f} of the dump")
    print(f"restore: verify {statistics.median(result['verify_s']):.3f} s of "
          f"{statistics.median(result['restore_s']):.3f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.checksum_cost", description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", default="/var/tmp", help="where the images go (default /var/tmp)")
    p.add_argument("--json", metavar="FILE")
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
