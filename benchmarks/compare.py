"""Side-by-side: pycr and criu dumping and restoring the same workloads.

For each workload (memhog trees of 64 MiB, 512 MiB and 2 GiB by default) and each round,
every available tool in turn (the order alternates between rounds) gets a freshly
started workload, dumps it (the tree is killed, as both tools do by default), and
restores it detached. Before each timed phase the harness syncs and pauses, because this
VM hands freed memory back to its host and the first touch of new memory is slow: one
phase should not pay for the previous one's page cache.

Measured per tool: wall time of the dump command, total size of the image directory,
wall time of the restore command (until it returns with the tree running). Each restore
is checked the way a user would: every PID is back and running, and every process reports
the same memory checksum as before the dump. Printed: medians with min-max and the
pycr/criu ratios, and the machine's copy limits (benchmarks.limits) from the same run.

Tools: criu from $CRIU, else PATH, else /opt/criu/sbin/criu (scripts/build-criu.sh);
pycr from $PYCR (a command line), else `python -m pycr`. A tool that is missing or
broken is reported in one line and skipped.

    python -m benchmarks.compare [--rounds 3] [--workloads 64,512,2048,512x16] [--tools criu,pycr]
"""

import argparse
import json
import os
import platform
import shlex
import shutil
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

    def problem(self):
        """None when the tool can be used here, else one line saying why not."""
        raise NotImplementedError

    def version(self):
        return ""

    def dump(self, pid, images_dir, log_path):
        raise NotImplementedError

    def restore(self, images_dir, log_path):
        raise NotImplementedError

    def _run(self, phase, argv, log_path, timeout=600, env=None):
        with open(log_path, "ab") as log:
            try:
                proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                      close_fds=True, timeout=timeout, env=env)
            except subprocess.TimeoutExpired:
                raise ToolFailed(f"{self.name} {phase}: timed out after {timeout} s") from None
            except OSError as exc:
                raise ToolFailed(f"{self.name} {phase}: cannot run {argv[0]}: {exc.strerror}") from None
        if proc.returncode != 0:
            raise ToolFailed(f"{self.name} {phase} failed (exit {proc.returncode}): "
                             f"{_last_error(Path(log_path).read_text(errors='replace'))}")


class Criu(Tool):
    name = "criu"

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

    def dump(self, pid, images_dir, log_path):
        self._run("dump", [self.binary, "dump", "-t", str(pid), "-D", str(images_dir), "--shell-job",
                           "-o", str(log_path)], log_path)

    def restore(self, images_dir, log_path):
        self._run("restore", [self.binary, "restore", "-D", str(images_dir), "--shell-job", "-d",
                              "-o", str(log_path)], log_path)


class Pycr(Tool):
    name = "pycr"

    def __init__(self, command=None):
        command = command or os.environ.get("PYCR")
        self.argv = shlex.split(command) if command else [sys.executable, "-m", "pycr"]
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

    def dump(self, pid, images_dir, log_path):
        self._run("dump", self.argv + ["dump", "-t", str(pid), "-D", str(images_dir)], log_path)

    def restore(self, images_dir, log_path):
        self._run("restore", self.argv + ["restore", "-D", str(images_dir), "-d"], log_path)


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

    Returns {"dump_s", "image_mib", "restore_s"}; raises ToolFailed.
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
        t0 = time.perf_counter()
        dumped = False
        try:
            tool.dump(wl.root, images, logs / "dump.log")
            dumped = True
        finally:
            dump_s = time.perf_counter() - t0
            left = wl.wait_dumped(timeout=10.0 if dumped else 0.0)
        if left:
            raise ToolFailed(f"{tool.name} dump left pids {left} behind; they block the restore")
        image_mib = dir_size(images) / MIB

        limits.settle(pause, warm)
        t0 = time.perf_counter()
        tool.restore(images, logs / "restore.log")
        restore_s = time.perf_counter() - t0

        if not wl.alive():
            raise ToolFailed(f"{tool.name} restore: not every pid of {wl.pids} is back and running")
        after = wl.checksums()
        bad = [pid for pid in wl.pids if after.get(pid, (0, None))[1] != before[pid][1]]
        if bad:
            raise ToolFailed(f"{tool.name} restore: memory checksum differs (or no answer) in pids {bad}")
        return {"dump_s": dump_s, "image_mib": image_mib, "restore_s": restore_s}
    finally:
        left = wl.kill()
        wl.cleanup()
        shutil.rmtree(images, ignore_errors=True)
        if left:
            print(f"compare: warning: pids {left} did not go away", file=sys.stderr)


METRICS = (("dump_s", "dump time (s)"), ("image_mib", "image size (MiB)"), ("restore_s", "restore time (s)"))


def _stat(values):
    if not values:
        return None
    return statistics.median(values), min(values), max(values)


def _fmt(st, digits):
    if st is None:
        return "-"
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
    ap.add_argument("--json", metavar="FILE", help="also write every raw figure here")
    args = ap.parse_args(argv)

    if os.geteuid() != 0:
        print("compare: both tools need root (ptrace of any process, PIDs restored as they were)")
        return 1
    procs.become_subreaper()
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

    print()
    print(format_results(results, names))
    lim = None
    if args.limits_rounds > 0:
        print()
        lim = limits.measure(rounds=args.limits_rounds, image_dir=work_dir, pause=args.pause)
        print(limits.format_table(lim))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": machine_line(), "date": datetime.now(timezone.utc).isoformat(),
             "tools": {t.name: t.version() for t in tools}, "results": results, "limits": lim}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
