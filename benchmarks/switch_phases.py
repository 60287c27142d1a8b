"""Where a pre-copy migration's switch-over goes, for two pycr installs in one run.

Each round migrates a fresh workload (benchmarks/workloads/dirtier.c: SIZE MiB writing RATE % of
its pages per second, 1 ms heartbeat) between the two hosts of benchmarks/net_migrate.py (network
namespaces, the veth shaped by tc tbf), once with each install, alternating which goes first.
Both sides run with -v; their log lines are stamped with the wall clock (one clock for both
namespaces), and the final pass is cut at pycr's own lines:

- source frozen: the final dump's "froze" line until its "dump done" (collect, copy, seal);
- to READY: "dump done" until the destination's "READY sent" (the set sent, received, checked,
  applied to the replica);
- commit and release: READY until the destination's "detached" (KILLED, the replica released);
- downtime: pycr migrate's own figure; switch gap: the workload's longest heartbeat gap that
  ends after the final freeze (the program's view of the switch);
- total: `pycr migrate` start to exit; pass 1 replica: the destination's share of the first pass
  after its last byte arrived ("replica S s" of the source's pass line).

    python -m benchmarks.switch_phases --python OTHER_INSTALL/.venv/bin/python [--sizes 256]
                                       [--rate 1] [--rounds 3] [--link 1gbit]

--python names the other install's interpreter (its pycr is imported from there); this tree's
pycr runs with the interpreter running this script. Medians per install, then other/this ratios.
Run as root.
"""

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import net_migrate as nm         # noqa: E402

#: Runs the pycr CLI with each log line stamped by time.time() instead of the time since start.
STAMPED = """
import logging, sys
import pycr.log as L
setup = L.setup
def stamped(*a, **k):
    setup(*a, **k)
    for h in L.log.handlers:
        h.setFormatter(logging.Formatter("%(created).6f %(message)s"))
L.setup = stamped
from pycr.cli import main
sys.exit(main(sys.argv[1:]))
"""

FIGURES = ("downtime_ms", "switch_gap_ms", "source_frozen_ms", "to_ready_ms", "commit_release_ms", "total_s",
           "pass1_replica_s")


def stamped_lines(text):
    """[(wall time, message)] of the stamped log lines in text."""
    out = []
    for line in text.splitlines():
        head, _, rest = line.partition(" ")
        try:
            out.append((float(head), rest))
        except ValueError:
            continue
    return out


def final_pass(src, dst):
    """The final pass's marks -> (froze, dump done, READY sent, detached) wall times."""
    froze = [t for t, m in src if m.startswith("froze ")][-1]
    done = next(t for t, m in src if t >= froze and m.startswith("dump done"))
    ready = next(t for t, m in dst if t >= froze and "READY sent" in m)
    detached = next(t for t, m in dst if t >= ready and m.startswith("detached "))
    return froze, done, ready, detached


def run(python, mib, rate, link):
    work = Path(tempfile.mkdtemp(prefix="pycr-switch-"))
    lab = nm.Lab(work, link)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}    # each install's own pycr
    saved, nm.ENV = nm.ENV, env
    try:
        wl = nm.Workload(lab, mib, rate, touch=False)
        time.sleep(1.0)
        port = nm.free_port()
        cli = [python, "-c", STAMPED]
        serve = lab.dst([*cli, "serve", "-v", "--listen", f"{lab.hosts.dst_addr}:{port}", "--secret-file",
                         lab.secret, "--once", "-W", work / "dst-work"])
        serve.out.wait_for("listening on", serve.proc, 60)
        since = time.monotonic_ns()
        offset = time.time() - time.monotonic()
        t0 = time.monotonic()
        m = lab.src([*cli, "migrate", "-v", "-t", wl.pid, "--to", f"{lab.hosts.dst_addr}:{port}", "--secret-file",
                     lab.secret])
        ended = m.finish("pycr migrate", 1800)
        serve.finish("pycr serve", 60)
        wl.wait_replica(since, time.monotonic_ns(), 60)
        froze, done, ready, detached = final_pass(stamped_lines(m.err.text()), stamped_lines(serve.err.text()))
        froze_ns = (froze - offset) * 1e9
        gaps = [(int(f[2]) - int(f[1])) / 1e6 for f in (line.split() for line in wl.lines())
                if len(f) == 3 and f[0] == "gap" and int(f[2]) >= froze_ns]
        pass1 = re.search(r"^pass 1 pre-dump: .*replica ([0-9.]+) s\)", m.out.text(), re.M)
        return dict(downtime_ms=nm.pycr_figures(m.text())["reported_downtime_s"] * 1e3,
                    switch_gap_ms=max(gaps, default=0.0), source_frozen_ms=(done - froze) * 1e3,
                    to_ready_ms=(ready - done) * 1e3, commit_release_ms=(detached - ready) * 1e3,
                    total_s=ended - t0, pass1_replica_s=float(pass1.group(1)) if pass1 else None)
    finally:
        nm.ENV = saved
        lab.close()
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", required=True, help="interpreter of the other pycr install")
    ap.add_argument("--sizes", default="256", help="MiB of the workload, comma-separated")
    ap.add_argument("--rate", type=float, default=1.0, help="percent of its pages written per second")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--link", default="1gbit")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("switch_phases: network namespaces need root")
    installs = {"this": sys.executable, "other": args.python}
    for mib in (int(s) for s in args.sizes.split(",")):
        rows = {name: [] for name in installs}
        for rnd in range(args.rounds):
            order = list(installs) if rnd % 2 == 0 else list(installs)[::-1]
            for name in order:
                try:
                    rows[name].append(run(installs[name], mib, args.rate, args.link))
                    print(f"{mib} MiB round {rnd + 1} {name}: " + ", ".join(
                        f"{k} {v:.1f}" for k, v in rows[name][-1].items() if v is not None), flush=True)
                except nm.MethodFailed as exc:
                    print(f"{mib} MiB round {rnd + 1} {name}: {exc}", flush=True)
        med = {name: {k: statistics.median(r[k] for r in rs if r[k] is not None) for k in FIGURES}
               for name, rs in rows.items() if rs}
        if len(med) < 2:
            continue
        print(f"\n{mib} MiB at {args.rate:g} %/s, {args.link}, medians of {args.rounds} rounds")
        print("| figure | this | other | this/other |\n|---|---|---|---|")
        for k in FIGURES:
            a, b = med["this"][k], med["other"][k]
            print(f"| {k} | {a:.1f} | {b:.1f} | {a / b:.2f} |" if b else f"| {k} | {a:.1f} | {b:.1f} | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
