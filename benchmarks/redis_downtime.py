"""Downtime of redis-server as its client sees it: `pycr migrate` next to a plain dump + restore.

redis-server (Debian's) is filled with a data set (DEBUG POPULATE, 1 GiB by default), then a
client runs INCR in a loop on one connection and records when each reply arrives. While it runs,
the server is moved once with `pycr migrate --tcp-established` (pre-copy: the data set is copied
while redis serves) and once with `pycr dump --tcp-established` followed by `pycr restore -d`
(everything copied while redis is stopped). The downtime is the client's longest gap between two
replies; the connection is the same throughout (TCP repair), so the client never reconnects.

Not a timed test: a script, run by hand as root:
    python benchmarks/redis_downtime.py [--size 1G] [--rounds 1]
It prints a markdown table and writes benchmarks/results/redis-downtime.json.
"""

import argparse
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from programs import free_port, connect                         # noqa: E402
from test_programs import redis                                  # noqa: E402

if __package__ in (None, ""):
    sys.path.insert(0, str(HERE.parent))
from benchmarks import procs                                     # noqa: E402

VALUE = 1000            # bytes per populated value


def cpu_name():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


class Client(threading.Thread):
    """INCR in a loop on one connection; the time of every reply."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.sock = connect(port)
        self.sock.settimeout(120)       # a reply may wait for the whole dump and restore
        self.stamps = []
        self.error = None
        self.stop = threading.Event()

    def run(self):
        try:
            while not self.stop.is_set():
                redis(self.sock, "INCR", "counter")
                self.stamps.append(time.monotonic())
        except Exception as exc:          # the figure is void: say so
            self.error = exc

    def longest_gap(self, since):
        stamps = [t for t in self.stamps if t >= since]
        return max((b - a for a, b in zip(stamps, stamps[1:])), default=0.0)


def pycr(*args):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pycr", *map(str, args)], capture_output=True, text=True,
                          timeout=1800, stdin=subprocess.DEVNULL)
    if proc.returncode:
        raise SystemExit(f"pycr {' '.join(map(str, args))} failed: {proc.stderr.strip()}")
    return proc, time.monotonic() - t0


def start_redis(size, work):
    port = free_port()
    server = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no", "--dir", str(work),
                               "--enable-debug-command", "yes"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    with connect(port) as c:
        redis(c, "DEBUG", "POPULATE", size // VALUE, "key", VALUE)
        used = int(re.search(rb"used_memory:(\d+)", redis(c, "INFO", "memory")).group(1))
    return server, port, used


def one_round(method, size, work):
    server, port, used = start_redis(size, work)
    client = Client(port)
    client.start()
    time.sleep(1.0)
    began = time.monotonic()
    pids = [server.pid]
    try:
        if method == "migrate":
            proc, seconds = pycr("migrate", "-t", server.pid, "--tcp-established", "--work-dir", work / "passes")
            m = re.search(r"\(pid (\d+) outside its namespace, namespace init (\d+)\)", proc.stdout)
            pids = [int(m.group(2)), int(m.group(1))]
            reported = float(re.search(r"downtime ([0-9.]+) s", proc.stdout).group(1))
            split = {"passes": len(re.findall(r"^pass \d+", proc.stdout, re.M))}
        else:
            # Reap the server as soon as the dump kills it (a blocking wait, in a thread): pycr waits
            # for the PID to be free, and it is the restored tree's.
            reaper = threading.Thread(target=server.wait, daemon=True)
            reaper.start()
            _, t_dump = pycr("dump", "-t", server.pid, "-D", work / "img", "--tcp-established")
            reaper.join()
            _, t_restore = pycr("restore", "-D", work / "img", "-d")
            seconds, reported = t_dump + t_restore, None
            split = {"dump_s": t_dump, "restore_s": t_restore}
        time.sleep(1.0)
        client.stop.set()
        client.join(30)
        if client.error:
            raise SystemExit(f"{method}: the client failed: {client.error!r}")
        return {"method": method, "used_memory": used, "client_gap_s": client.longest_gap(began),
                "command_s": seconds, "pycr_reported_downtime_s": reported,
                "replies": len(client.stamps), **split}
    finally:
        procs.kill_pids([p for root in pids if procs.state(root) for p in procs.tree_pids(root)])
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G", help="data set size (K, M, G suffixes)")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    size = int(args.size[:-1]) << {"K": 10, "M": 20, "G": 30}[args.size[-1].upper()] \
        if args.size[-1].isalpha() else int(args.size)
    procs.become_subreaper()
    results = []
    work = Path(tempfile.mkdtemp(prefix="pycr-redis-", dir="/var/tmp"))
    try:
        for _ in range(args.rounds):
            for method in ("dump+restore", "migrate"):
                results.append(one_round(method, size, work))
                print(results[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nCPU: {cpu_name()}, kernel {platform.release()}, redis data set {args.size}\n")
    print("| method | client's longest gap | command took | pycr's downtime |")
    print("|---|---|---|---|")
    for r in results:
        rep = f"{r['pycr_reported_downtime_s']:.3f} s" if r["pycr_reported_downtime_s"] is not None else "-"
        print(f"| {r['method']} | {r['client_gap_s']:.3f} s | {r['command_s']:.2f} s | {rep} |")
    out = HERE / "results" / "redis-downtime.json"
    out.write_text(json.dumps({"cpu": cpu_name(), "kernel": platform.release(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
