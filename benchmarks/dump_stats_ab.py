"""Paired A/B of `pycr dump --display-stats` phases for two pycr installs, on one memhog tree.

One memhog tree (SIZE MiB over PROCS processes) is started and left running; each round dumps
it with -R once with each install, alternating which goes first, into a fresh directory that is
removed right after. Per phase of --display-stats: each install's median and the median of the
paired B/A ratios (one ratio per round).

    python -m benchmarks.dump_stats_ab --a A/.venv/bin/pycr --b B/.venv/bin/pycr
                                       [--mib 512] [--procs 16] [--rounds 8]

Use regular (non-editable) installs: an editable one compiles every module at each start.
Run as root.
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess

from benchmarks import procs

_PHASE = re.compile(r"^(.*?) time: (\d+) us$")


def dump_phases(pycr, root, images):
    """{phase: ms} of one `pycr dump -R --display-stats` of the tree at root."""
    shutil.rmtree(images, ignore_errors=True)
    os.makedirs(images)
    try:
        res = subprocess.run([pycr, "dump", "-t", str(root), "-D", images, "-R", "--display-stats"],
                             capture_output=True, text=True, check=True)
    finally:
        shutil.rmtree(images, ignore_errors=True)
    found = (_PHASE.match(line) for line in (res.stdout + res.stderr).splitlines())
    return {m.group(1): int(m.group(2)) / 1000 for m in found if m}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a", required=True, help="pycr executable of install A")
    ap.add_argument("--b", required=True, help="pycr executable of install B")
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--procs", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    procs.become_subreaper()
    wl = procs.Workload(args.mib, args.procs).start()
    seen = {"A": [], "B": []}
    try:
        for r in range(args.rounds):
            for name in ("AB" if r % 2 == 0 else "BA"):
                pycr = args.a if name == "A" else args.b
                seen[name].append(dump_phases(pycr, wl.root, str(procs.CACHE / f"ab-{name}")))
    finally:
        wl.kill()
        wl.cleanup()
    print(f"{args.procs} processes, {args.mib} MiB, {args.rounds} paired rounds")
    for phase in seen["A"][0]:
        a = [run[phase] for run in seen["A"]]
        b = [run[phase] for run in seen["B"]]
        ratios = [y / x for x, y in zip(a, b) if x]
        ratio = f"{statistics.median(ratios):.3f}" if ratios else "-"
        print(f"{phase:30s} A {statistics.median(a):9.1f} ms   B {statistics.median(b):9.1f} ms   B/A {ratio}")


if __name__ == "__main__":
    main()
