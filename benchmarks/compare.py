"""Side-by-side: pycr and criu dumping and restoring the same workloads.

For each workload (memhog trees of 64 MiB, 512 MiB and 2 GiB by default) and each round,
every available tool in turn (the order alternates between rounds) gets a freshly
started workload, dumps it (the tree is killed, as both tools do by default), and
restores it detached. Before each timed phase the harness syncs and pauses, because this
VM hands freed memory back to its host and the first touch of new memory is slow: one
phase should not pay for the previous one's page cache.

Measured per tool: wall time of the dump command, the time the tree stayed frozen (criu's
own "Frozen time" from `--display-stats`; for pycr the same span, freeze until the kill
begins, from benchmarks.pycr_runs), total size of the
image directory, wall time of the restore command (until it returns with the tree
running). Each restore
is checked the way a user would: every PID is back and running, and every process reports
the same memory checksum as before the dump. Printed: medians with min-max and the
pycr/criu ratios, and the machine's copy limits (benchmarks.limits) from the same run.

Tools: criu from $CRIU, else PATH, else /opt/criu/sbin/criu (scripts/build-criu.sh);
pycr from $PYCR (a command line), else `python -m benchmarks.pycr_runs` (pycr's CLI from
this checkout, which also prints the frozen time). A tool that is missing or
broken is reported in one line and skipped.

    python -m benchmarks.compare [--rounds 3] [--workloads 64,512,2048,512x16] [--tools criu,pycr]

Incremental path (--incremental 2048, on by default; 0 turns it off): a process writing
1 % of its pages per second. pycr takes PREDUMPS pre-dumps (--predumps 2) and a final dump
with --prev-images-dir; criu cannot pre-dump on this kernel (no soft-dirty: `criu check
--feature mem_dirty_track` fails, which is recorded), so its plain dump of the same kind of
process is the comparison. The restore is checked by the PIDs running and counting on.
"""

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import limits, procs
else:
    from . import limits, procs

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20


class ToolFailed(Exception):
    """One dump or restore did not work; the message is one line naming the cause."""


def _last_error(text):
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or ln.startswith(("pycr:", "E:"))]
    return (errors or lines or ["(no output)"])[-1][:200]


class Tool:
    name = "?"
    last_run = None         # procs.TimedRun of the latest command
    last_stats = None       # its --display-stats breakdown (display_stats()), or None
    log_truncated = False   # the tool rewrites its log file on each run (criu -o)

    def problem(self):
        """None when the tool can be used here, else one line saying why not."""
        raise NotImplementedError

    def version(self):
        return ""

    def dump(self, pid, images_dir, log_path, prev=None):
        """Dump and kill the tree; -> seconds the tool says it was frozen, or None."""
        raise NotImplementedError

    def pre_dump_problem(self):
        """None when this tool can pre-dump here, else one line saying why not."""
        return "not implemented"

    def pre_dump(self, pid, images_dir, log_path, prev=None):
        """One pre-dump pass (the tree keeps running); -> frozen seconds or None."""
        raise NotImplementedError

    def restore(self, images_dir, log_path):
        raise NotImplementedError

    def _run(self, phase, argv, log_path, timeout=600, env=None):
        """Run one command of the tool; its exact wall time and rusage go to self.last_run."""
        self.last_run = self.last_stats = None
        start = 0 if self.log_truncated else _log_size(log_path)
        with open(log_path, "ab") as log:
            try:
                proc = procs.run_timed(argv, log, env=env, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise ToolFailed(f"{self.name} {phase}: timed out after {timeout} s") from None
            except OSError as exc:
                raise ToolFailed(f"{self.name} {phase}: cannot run {argv[0]}: {exc.strerror}") from None
        self.last_run = proc
        self.last_stats = display_stats(_log_tail(log_path, start))
        if proc.returncode != 0:
            raise ToolFailed(f"{self.name} {phase} failed (exit {proc.returncode}): "
                             f"{_last_error(Path(log_path).read_text(errors='replace'))}")


class Criu(Tool):
    name = "criu"
    log_truncated = True

    def __init__(self, binary=None):
        self.binary = binary or os.environ.get("CRIU") or shutil.which("criu") or "/opt/criu/sbin/criu"

    def problem(self):
        if not (os.path.isfile(self.binary) and os.access(self.binary, os.X_OK)):
            return f"criu: not found at {self.binary} (set CRIU= or run scripts/build-criu.sh)"
        check = subprocess.run([self.binary, "check"], capture_output=True, text=True, close_fds=True)
        if check.returncode != 0:
            return f"criu: `criu check` failed: {_last_error(check.stdout + check.stderr)}"
        return None

    def version(self):
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True).stdout
        return " ".join(out.split())

    def dump(self, pid, images_dir, log_path, prev=None):
        self._run("dump", [self.binary, "dump", "-t", str(pid), "-D", str(images_dir), "--shell-job",
                           "--display-stats", "-o", str(log_path)], log_path)
        return criu_frozen_seconds(_log_tail(log_path, 0))   # criu truncates its -o log

    def pre_dump_problem(self):
        check = subprocess.run([self.binary, "check", "--feature", "mem_dirty_track"],
                               capture_output=True, text=True, close_fds=True)
        if check.returncode == 0:
            return None
        return f"criu pre-dump: unavailable here (`criu check --feature mem_dirty_track`: " \
               f"{_last_error(check.stdout + check.stderr)}; the kernel has no soft-dirty)"

    def pre_dump(self, pid, images_dir, log_path, prev=None):
        argv = [self.binary, "pre-dump", "-t", str(pid), "-D", str(images_dir), "--display-stats",
                "-o", str(log_path)]
        self._run("pre-dump", argv + (["--prev-images-dir", str(prev)] if prev else []), log_path)
        return criu_frozen_seconds(_log_tail(log_path, 0))

    def restore(self, images_dir, log_path):
        self._run("restore", [self.binary, "restore", "-D", str(images_dir), "--shell-job", "-d",
                              "--display-stats", "-o", str(log_path)], log_path)


class Pycr(Tool):
    name = "pycr"

    def __init__(self, command=None):
        command = command or os.environ.get("PYCR")
        # default: the pycr CLI of this checkout, through benchmarks.pycr_runs, which adds
        # the frozen time measured as criu measures its own (freeze until kill or thaw)
        self.argv = shlex.split(command) if command else [sys.executable, "-m", "benchmarks.pycr_runs"]
        self.env = dict(os.environ)
        if not command:  # `python -m pycr` from this checkout
            self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), self.env.get("PYTHONPATH")]))

    def problem(self):
        for sub in ("dump", "restore"):
            try:
                proc = subprocess.run(self.argv + [sub, "--help"], capture_output=True, text=True,
                                      env=self.env, close_fds=True, timeout=60)
            except (OSError, subprocess.TimeoutExpired) as exc:
                return f"pycr: cannot run {shlex.join(self.argv)}: {exc}"
            if proc.returncode != 0:
                return f"pycr: `{sub}` is not available yet: {_last_error(proc.stdout + proc.stderr)}"
        return None

    def version(self):
        out = subprocess.run(self.argv + ["--version"], capture_output=True, text=True, env=self.env)
        return out.stdout.strip()

    def _run(self, phase, argv, log_path, timeout=600, env=None):
        super()._run(phase, argv, log_path, timeout, env or self.env)

    def dump(self, pid, images_dir, log_path, prev=None):
        start = _log_size(log_path)
        argv = self.argv + ["dump", "-v", "-t", str(pid), "-D", str(images_dir), "--display-stats"]
        self._run("dump", argv + (["--prev-images-dir", str(prev)] if prev else []), log_path)
        return pycr_frozen_seconds(_log_tail(log_path, start))

    def pre_dump_problem(self):
        return None

    def pre_dump(self, pid, images_dir, log_path, prev=None):
        start = _log_size(log_path)
        argv = self.argv + ["pre-dump", "-v", "-t", str(pid), "-D", str(images_dir), "--display-stats"]
        self._run("pre-dump", argv + (["--prev-images-dir", str(prev)] if prev else []), log_path)
        return pycr_frozen_seconds(_log_tail(log_path, start))

    def restore(self, images_dir, log_path):
        self._run("restore", self.argv + ["restore", "-D", str(images_dir), "-d", "--display-stats"], log_path)


def _log_size(path):
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def _log_tail(path, start):
    """What was appended to a log since it was start bytes long."""
    with open(path, "rb") as f:
        f.seek(start)
        return f.read().decode(errors="replace")


def criu_frozen_seconds(text):
    """criu --display-stats prints "Frozen time: N us" (from its stats-dump image); the last one counts."""
    found = re.findall(r"Frozen time:\s*(\d+)\s*us", text)
    return int(found[-1]) / 1e6 if found else None


def display_stats(text):
    """The last --display-stats block of either tool in text -> {"phases": {name: s},
    "counters": {name: n}, "total_s": s or None}, or None. Both print criu's layout:
    "Displaying dump stats:", then "<phase> time: N us" lines and "<counter>: N" lines
    (pycr's "Total time" is the whole command, not a phase)."""
    start = text.rfind("Displaying ")
    if start < 0:
        return None
    phases, counters = {}, {}
    for line in text[start:].splitlines()[1:]:
        m = re.match(r"^\s*(?:\(\s*[\d.]+\)\s*)?([^:]+?) time: (\d+) us\s*$", line)
        if m:
            phases[m.group(1)] = int(m.group(2)) / 1e6
            continue
        m = re.match(r"^\s*(?:\(\s*[\d.]+\)\s*)?([^:]+): (\d+)\b", line)
        if not m:
            break
        counters[m.group(1)] = int(m.group(2))
    total = phases.pop("Total", None)
    return {"phases": phases, "counters": counters, "total_s": total}


def pycr_frozen_seconds(text):
    """Seconds from the freeze until the kill or thaw began.

    benchmarks.pycr_runs prints "frozen until release: S s". Failing that (a $PYCR
    command), pycr -v's "... done: X MiB of pages, frozen S s, total T s", which also
    counts the wait for a killed tree's PIDs to be free.
    """
    found = re.findall(r"frozen until release: ([\d.]+) s", text) or \
        re.findall(r"done: [\d.]+ MiB of pages, frozen ([\d.]+) s", text)
    return float(found[-1]) if found else None


def parse_workload(spec):
    """'512' -> (512 MiB, 1 process); '512x16' -> (512 MiB over 16 processes)."""
    mib, _, nproc = spec.partition("x")
    return int(mib), int(nproc or 1)


def workload_label(mib, nproc):
    size = f"{mib // 1024} GiB" if mib >= 1024 and mib % 1024 == 0 else f"{mib} MiB"
    return size if nproc == 1 else f"{size} x{nproc} procs"


def dir_size(path):
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def one_round(tool, mib, nproc, work_dir, pause, prefault=True):
    """Start a workload, dump it with tool, restore it, check it; always clean up.

    Returns {"dump_s", "frozen_s" (None if the tool does not say), "image_mib", "restore_s"};
    raises ToolFailed.
    prefault: warm the VM's free memory before each timed phase (see limits.settle).
    """
    # a dump allocates page cache for the images, a restore the tree's memory: about mib each
    warm = (mib + 64) * MIB if prefault else 0
    images = Path(work_dir) / f"{tool.name}-images"
    logs = Path(work_dir) / f"{tool.name}-logs"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    logs.mkdir(parents=True, exist_ok=True)
    wl = procs.Workload(mib, nproc, workdir=work_dir)
    try:
        wl.start()
        before = wl.checksums()
        if len(before) != len(wl.pids):
            raise ToolFailed(f"workload answered {len(before)} of {len(wl.pids)} checksum requests")

        limits.settle(pause, warm)
        wl.reap_during()
        dumped = False
        try:
            frozen_s = tool.dump(wl.root, images, logs / "dump.log")
            dumped = True
        finally:
            left = wl.wait_dumped(timeout=10.0 if dumped else 0.0)
        if left:
            raise ToolFailed(f"{tool.name} dump left pids {left} behind; they block the restore")
        dump_run, dump_stats = tool.last_run, tool.last_stats
        image_mib = dir_size(images) / MIB

        limits.settle(pause, warm)
        tool.restore(images, logs / "restore.log")
        restore_run, restore_stats = tool.last_run, tool.last_stats

        if not wl.alive():
            raise ToolFailed(f"{tool.name} restore: not every pid of {wl.pids} is back and running")
        after = wl.checksums()
        bad = [pid for pid in wl.pids if after.get(pid, (0, None))[1] != before[pid][1]]
        if bad:
            raise ToolFailed(f"{tool.name} restore: memory checksum differs (or no answer) in pids {bad}")
        return {"dump_s": dump_run.seconds, "frozen_s": frozen_s, "image_mib": image_mib,
                "restore_s": restore_run.seconds, "dump_cpu_s": _cpu_seconds(dump_run),
                "restore_cpu_s": _cpu_seconds(restore_run), "dump_stats": dump_stats,
                "restore_stats": restore_stats}
    finally:
        left = wl.kill()
        wl.cleanup()
        shutil.rmtree(images, ignore_errors=True)
        if left:
            print(f"compare: warning: pids {left} did not go away", file=sys.stderr)


def _cpu_seconds(run):
    """User + system CPU seconds of a finished command (its reaped children included)."""
    return run.rusage.ru_utime + run.rusage.ru_stime


def incremental_round(tool, mib, work_dir, pause, predumps, interval=1.0, rate_pct=1.0, prefault=True):
    """A process writing rate_pct % of its pages per second: predumps pre-dump passes
    (interval s apart) then the final dump, or a plain dump when predumps is 0; restore.

    Returns {"passes": [{"wall_s", "frozen_s", "image_mib"}], "dump_s", "frozen_s",
    "image_mib" (final directory only), "chain_mib" (every directory), "restore_s"}.
    The restore is checked by every PID running and its tick count growing.
    """
    warm = (mib + 64) * MIB if prefault else 0
    base = Path(work_dir) / f"{tool.name}-chain"
    logs = Path(work_dir) / f"{tool.name}-logs"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    logs.mkdir(parents=True, exist_ok=True)
    wl = procs.Workload(mib, rate_pct=rate_pct, workdir=work_dir)
    try:
        wl.start()
        time.sleep(interval)
        passes, prev = [], None
        for n in range(1, predumps + 1):
            limits.settle(pause, warm if n == 1 else 0)
            d = base / f"pre{n}"
            d.mkdir()
            frozen = tool.pre_dump(wl.root, d, logs / "pre-dump.log", prev=f"../{prev.name}" if prev else None)
            passes.append({"wall_s": tool.last_run.seconds, "frozen_s": frozen, "image_mib": dir_size(d) / MIB,
                           "stats": tool.last_stats})
            prev = d
            time.sleep(max(interval - pause, 0))
        final = base / "final"
        final.mkdir()
        limits.settle(pause, warm if not predumps else 0)
        wl.reap_during()
        dumped = False
        try:
            frozen_s = tool.dump(wl.root, final, logs / "dump.log", prev=f"../{prev.name}" if prev else None)
            dumped = True
        finally:
            left = wl.wait_dumped(timeout=10.0 if dumped else 0.0)
        if left:
            raise ToolFailed(f"{tool.name} dump left pids {left} behind; they block the restore")
        dump_s, dump_stats = tool.last_run.seconds, tool.last_stats
        image_mib, chain_mib = dir_size(final) / MIB, dir_size(base) / MIB
        limits.settle(pause, warm)
        tool.restore(final, logs / "restore.log")
        restore_s, restore_stats = tool.last_run.seconds, tool.last_stats
        first = wl.checksums(timeout=30)
        time.sleep(0.1)
        second = wl.checksums(timeout=30)
        if not wl.alive() or any(second.get(p, (0,))[0] <= first.get(p, (1 << 62,))[0] for p in wl.pids):
            raise ToolFailed(f"{tool.name} restore: not every pid of {wl.pids} is back and counting")
        return {"passes": passes, "dump_s": dump_s, "frozen_s": frozen_s, "image_mib": image_mib,
                "chain_mib": chain_mib, "restore_s": restore_s, "dump_stats": dump_stats,
                "restore_stats": restore_stats}
    finally:
        left = wl.kill()
        wl.cleanup()
        shutil.rmtree(base, ignore_errors=True)
        if left:
            print(f"compare: warning: pids {left} did not go away", file=sys.stderr)


METRICS = (("dump_s", "dump time (s)"), ("frozen_s", "frozen (s)"), ("image_mib", "image size (MiB)"),
           ("restore_s", "restore time (s)"))


def _stat(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.median(values), min(values), max(values)


def _fmt(st, digits):
    if st is None:
        return "n/a"
    med, lo, hi = st
    return f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def format_results(results, tool_names):
    """A table: workload, metric, each tool's median (min-max), and pycr/criu."""
    cols = [f"{n} median (min-max)" for n in tool_names]
    ratio = "criu" in tool_names and "pycr" in tool_names
    head = f"{'workload':<18} {'metric':<17} " + " ".join(f"{c:>26}" for c in cols) + (
        f" {'pycr/criu':>10}" if ratio else "")
    lines = [head, "-" * len(head)]
    for label, per_tool in results.items():
        for key, title in METRICS:
            digits = 1 if key == "image_mib" else 3
            stats = {n: _stat([r[key] for r in per_tool.get(n, {}).get("ok", [])]) for n in tool_names}
            row = f"{label:<18} {title:<17} " + " ".join(f"{_fmt(stats[n], digits):>26}" for n in tool_names)
            if ratio:
                c, p = stats["criu"], stats["pycr"]
                row += f" {p[0] / c[0]:10.2f}" if c and p and c[0] else f" {'-':>10}"
            lines.append(row)
        for n in tool_names:
            for msg in per_tool.get(n, {}).get("failed", []):
                lines.append(f"{label:<18} {n} failed: {msg}")
    return "\n".join(lines)


def format_breakdown(results, tool_names):
    """Where the time goes: each tool's --display-stats phases, medians in ms over the rounds."""
    lines = ["where the time goes (--display-stats, median ms; criu's phases overlap, pycr's do not)"]
    for label, per_tool in results.items():
        for name in tool_names:
            rounds = per_tool.get(name, {}).get("ok", [])
            for cmd in ("dump", "restore"):
                got = [r[f"{cmd}_stats"] for r in rounds if r.get(f"{cmd}_stats")]
                if not got:
                    continue
                phases = list(dict.fromkeys(p for g in got for p in g["phases"]))
                parts = [f"{p} {statistics.median(g['phases'].get(p, 0.0) for g in got) * 1e3:.1f}" for p in phases]
                wall = statistics.median(r[f"{cmd}_s"] for r in rounds)
                lines.append(f"  {label} {name} {cmd} (wall {wall * 1e3:.1f}): " + ", ".join(parts))
    return "\n".join(lines)


def format_incremental(label, per_tool, notes):
    """The incremental table: each pre-dump pass, then the final dump and the restore."""
    lines = [f"incremental path, {label}", "-" * 60]
    for name, slot in per_tool.items():
        rounds = slot["ok"]
        npass = max((len(r["passes"]) for r in rounds), default=0)
        for k in range(npass):
            got = [r["passes"][k] for r in rounds if len(r["passes"]) > k]
            lines.append(f"{name:<5} pre-dump {k + 1}: wall {_fmt(_stat([g['wall_s'] for g in got]), 3)} s, "
                         f"frozen {_fmt(_stat([g['frozen_s'] for g in got]), 3)} s, "
                         f"{_fmt(_stat([g['image_mib'] for g in got]), 1)} MiB")
        kind = "final dump" if npass else "plain dump"
        lines.append(f"{name:<5} {kind}: wall {_fmt(_stat([r['dump_s'] for r in rounds]), 3)} s, "
                     f"frozen {_fmt(_stat([r['frozen_s'] for r in rounds]), 3)} s, "
                     f"{_fmt(_stat([r['image_mib'] for r in rounds]), 1)} MiB "
                     f"(chain {_fmt(_stat([r['chain_mib'] for r in rounds]), 1)} MiB)")
        lines.append(f"{name:<5} restore: {_fmt(_stat([r['restore_s'] for r in rounds]), 3)} s")
        for msg in slot["failed"]:
            lines.append(f"{name:<5} failed: {msg}")
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def machine_line():
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kib = int(open("/proc/meminfo").readline().split()[1])
    except OSError:
        mem_kib = 0
    return (f"Linux {platform.release()} {platform.machine()}, {os.cpu_count()} CPUs ({cpu}), "
            f"{mem_kib / (1 << 20):.0f} GiB RAM")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workloads", default="64,512,2048",
                    help="comma-separated MiB, optionally xNPROC for a tree (default 64,512,2048)")
    ap.add_argument("--tools", default="criu,pycr")
    ap.add_argument("--work-dir", default=str(procs.CACHE / "compare"),
                    help="images and logs go here (its filesystem is the one measured)")
    ap.add_argument("--pause", type=float, default=0.5, help="seconds after sync before each timed phase")
    ap.add_argument("--no-prefault", action="store_true",
                    help="do not touch and free memory before each timed phase (then the VM's host faults "
                         "on memory it took back are measured too)")
    ap.add_argument("--limits-rounds", type=int, default=3, help="rounds of benchmarks.limits (0: skip)")
    ap.add_argument("--incremental", type=int, default=2048, metavar="MIB",
                    help="size of the busy process (1 %% of pages written per second) for the incremental "
                         "comparison (default 2048; 0: skip)")
    ap.add_argument("--predumps", type=int, default=2, help="pre-dump passes before the final dump (default 2)")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between passes (default 1)")
    ap.add_argument("--json", metavar="FILE", help="also write every raw figure here")
    args = ap.parse_args(argv)

    if os.geteuid() != 0:
        print("compare: both tools need root (ptrace of any process, PIDs restored as they were)")
        return 1
    procs.become_subreaper()
    # SIGTERM and SIGHUP end the run as Ctrl-C does, through the finally blocks that kill
    # the workload by PID (their default action would leave it running)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.default_int_handler)
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine_line()}")

    makers = {"criu": Criu, "pycr": Pycr}
    tools = []
    for name in args.tools.split(","):
        tool = makers[name.strip()]()
        why = tool.problem()
        if why:
            print(f"# {why}; skipped")
        else:
            print(f"# {name}: {tool.version()}")
            tools.append(tool)
    names = [t.name for t in tools]

    results = {}
    for spec in args.workloads.split(","):
        mib, nproc = parse_workload(spec)
        label = workload_label(mib, nproc)
        per_tool = results.setdefault(label, {})
        for r in range(args.rounds):
            order = tools if r % 2 == 0 else tools[::-1]
            for tool in order:
                slot = per_tool.setdefault(tool.name, {"ok": [], "failed": []})
                try:
                    res = one_round(tool, mib, nproc, work_dir, args.pause, not args.no_prefault)
                    slot["ok"].append(res)
                    print(f"  {label} round {r + 1} {tool.name}: dump {res['dump_s']:.3f} s, "
                          f"image {res['image_mib']:.1f} MiB, restore {res['restore_s']:.3f} s", flush=True)
                except (ToolFailed, RuntimeError) as exc:
                    slot["failed"].append(str(exc))
                    print(f"  {label} round {r + 1} {tool.name}: {exc}", flush=True)

    incremental, notes = {}, []
    if args.incremental > 0 and tools:
        label = workload_label(args.incremental, 1) + ", 1 % of pages written per second"
        can = {}
        for tool in tools:
            why = tool.pre_dump_problem()
            can[tool.name] = why is None
            if why:
                notes.append(f"{why}; its plain dump of the same process is shown")
                print(f"# {why}", flush=True)
        for r in range(args.rounds):
            order = tools if r % 2 == 0 else tools[::-1]
            for tool in order:
                slot = incremental.setdefault(tool.name, {"ok": [], "failed": []})
                n = args.predumps if can[tool.name] else 0
                try:
                    res = incremental_round(tool, args.incremental, work_dir, args.pause, n, args.interval,
                                            prefault=not args.no_prefault)
                    slot["ok"].append(res)
                    passes = ", ".join(f"{p['wall_s']:.3f}/{p['frozen_s'] or 0:.3f} s {p['image_mib']:.1f} MiB"
                                       for p in res["passes"])
                    print(f"  incremental round {r + 1} {tool.name}: passes [{passes}], final dump "
                          f"{res['dump_s']:.3f} s (frozen {res['frozen_s'] or 0:.3f} s, {res['image_mib']:.1f} MiB), "
                          f"restore {res['restore_s']:.3f} s", flush=True)
                except (ToolFailed, RuntimeError) as exc:
                    slot["failed"].append(str(exc))
                    print(f"  incremental round {r + 1} {tool.name}: {exc}", flush=True)

    print()
    print(f"# {machine_line()}")
    print(format_results(results, names))
    print()
    print(format_breakdown(results, names))
    if incremental:
        print()
        print(format_incremental(workload_label(args.incremental, 1), incremental, notes))
    lim = None
    if args.limits_rounds > 0:
        print()
        lim = limits.measure(rounds=args.limits_rounds, image_dir=work_dir, pause=args.pause)
        print(limits.format_table(lim))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": machine_line(), "date": datetime.now(timezone.utc).isoformat(),
             "tools": {t.name: t.version() for t in tools}, "results": results, "limits": lim,
             "incremental": {"mib": args.incremental, "predumps": args.predumps, "interval_s": args.interval,
                             "rate_pct": 1.0, "results": incremental, "notes": notes}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
