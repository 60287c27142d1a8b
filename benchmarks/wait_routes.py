"""pycr's waits with and without kernel wake-ups: freezing a tree, and freeing its PIDs after the kill.

A tree of N processes (each with T threads and M MiB of touched memory) is frozen and
killed in-process. Timed: freeze() (each thread's stop waited for with a timeout), and
FrozenTree.wait_gone from the SIGKILLs until every PID is free. Rounds alternate between
the wake-up routes ("wake": the stop wait sleeps on SIGCHLD through a signalfd, the PID
wait in epoll on pidfds, woken when a task exits and when it is reaped) and the fallback
ones ("poll": waitpid WNOHANG with a backoff; waitpid WNOHANG and /proc every 2 ms). This script is the root's parent and the tree's child subreaper
(orphans would otherwise wait for PID 1's reaper, which is slow in some VMs), so pycr
itself reaps every process as parent and tracer. Also timed: the one-off probe of
whether the kernel wakes pidfd pollers at a reap.

    python -m benchmarks.wait_routes [--procs 16] [--threads 2] [--mib 64] [--rounds 10]
"""

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pycr import pidwait                           # noqa: E402
from pycr.abi import PR_SET_CHILD_SUBREAPER        # noqa: E402
from pycr.freeze import freeze                     # noqa: E402
from pycr.ptrace import childwait                  # noqa: E402

CHILD = """
import mmap, os, sys, threading, time
procs, threads, mib = map(int, sys.argv[1:4])
for _ in range(procs - 1):
    if os.fork() == 0:
        break
m = mmap.mmap(-1, mib << 20)
for off in range(0, mib << 20, 4096):
    m[off] = 1
for _ in range(threads - 1):
    threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
sys.stdout.write("up\\n"); sys.stdout.flush()
time.sleep(3600)
"""


def one(args, route):
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(args.procs), str(args.threads), str(args.mib)],
                         stdout=subprocess.PIPE, text=True)
    for _ in range(args.procs):
        p.stdout.readline()
    childwait.usable = (lambda: True) if route == "wake" else (lambda: False)
    pidwait._reap_wakes = route == "wake"
    began = time.perf_counter()
    tree = freeze(p.pid)
    frozen = time.perf_counter() - began
    assert len(tree.processes) == args.procs
    tree.send_kill()
    began = time.perf_counter()
    tree.wait_gone()
    gone = time.perf_counter() - began
    p.stdout.close()
    p.wait()
    return frozen, gone


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    pidwait._reap_wakes = None
    began = time.perf_counter()
    wakes = pidwait.reap_wakes()
    probe = time.perf_counter() - began
    print(f"probe: pidfd pollers woken at a reap: {wakes} ({probe * 1e3:.2f} ms)")
    if not wakes:
        return
    times = {"wake": [], "poll": []}
    for r in range(args.rounds):
        for route in (("wake", "poll") if r % 2 == 0 else ("poll", "wake")):
            times[route].append(one(args, route))
    print(f"{args.procs} procs x {args.threads} threads x {args.mib} MiB, {args.rounds} rounds, medians (min-max) ms")
    for i, what in enumerate(("freeze", "wait_gone")):
        med = {}
        for route, t in times.items():
            t = [x[i] * 1e3 for x in t]
            med[route] = statistics.median(t)
            print(f"  {what:9} {route:4} {med[route]:8.2f} ({min(t):.2f}-{max(t):.2f})")
        print(f"  {what:9} wake/poll {med['wake'] / med['poll']:.2f}")


if __name__ == "__main__":
    main()
