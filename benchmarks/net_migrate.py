"""Migration between two hosts on one machine: pycr's modes next to criu's, over a shaped link.

Two hosts are two network namespaces joined by a veth pair (tests/netns.py); the destination
also has its own PID and mount namespaces. A token bucket (tc tbf) on the source's end limits
the link (1 Gbit/s by default; this kernel has no netem, so no latency is added). Each run gets
fresh namespaces and a fresh workload (benchmarks/workloads/dirtier.c: SIZE MiB writing RATE %
of its pages per second, with a 1 ms heartbeat), then one method moves it:

- pycr pre-copy: `pycr serve` + `pycr migrate --to` (and `--mode post-copy|hybrid` when this
  pycr has them: one entry each in METHODS);
- pycr lazy: `pycr dump --lazy-pages` + the images copied over the link + `pycr lazy-pages
  --page-server` + `pycr restore --lazy-pages`;
- criu page-server: `criu page-server` on the destination, `criu dump --page-server`, the rest of
  the images copied over the link, `criu restore`;
- criu lazy-pages: `criu dump --lazy-pages`, the images copied, `criu lazy-pages --page-server`,
  `criu restore --lazy-pages`.

Measured: downtime as the tool reports it (pycr migrate's "downtime"; for the others the span
from the dump command's start to the restore command's return, an upper bound) and as the
program sees it (its longest heartbeat gap across the migration); total time (until the last
page has moved); bytes over the veth in both directions (its counters before and after, image
copies included); for lazy methods the fault time median and p99 (pycr's summary) and the
throughput of the replica reading every page once right after it starts.

    python -m benchmarks.net_migrate [--sizes 256] [--rates 1,20] [--rounds 1] [--link 1gbit]
                                     [--methods pycr-precopy,...] [--json FILE]

Run as root. Every namespace, qdisc and process is removed at the end, also on Ctrl-C.
"""

import argparse
import json
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

from netns import TwoHosts                                      # noqa: E402
from benchmarks import compare, procs                           # noqa: E402

MIB = 1 << 20
CRIU = os.environ.get("CRIU") or shutil.which("criu") or "/opt/criu/sbin/criu"
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))

DOWNTIME = re.compile(r"^downtime ([\d.]+) s \(source frozen -> replica running\)", re.M)
PASSES = re.compile(r"bytes sent in (\d+) pass(?:es)?\b")
FAULTS = re.compile(r"fault median ([\d.]+) us, p99 ([\d.]+) us")


class MethodFailed(Exception):
    """One run did not work; the message is one line naming the cause."""


# ---------------------------------------------------------------- parsing (tested in test_harness)

def heartbeat(lines, since_ns):
    """-> (longest gap in s since since_ns, last heartbeat ns or None, touched (bytes, s) or None)."""
    gaps, last_hb, touched = [], None, None
    for line in lines:
        f = line.split()
        if len(f) == 3 and f[0] == "gap" and int(f[2]) > since_ns:
            gaps.append((int(f[2]) - max(int(f[1]), since_ns)) / 1e9)
        elif len(f) == 3 and f[0] == "hb":
            last_hb = int(f[1])
        elif len(f) == 3 and f[0] == "touched":
            touched = (int(f[1]), int(f[2]) / 1e9)
    return max(gaps, default=0.0), last_hb, touched


def veth_delta(before, after):
    """Bytes both ways between two (tx, rx) readings."""
    return (after[0] - before[0]) + (after[1] - before[1])


def tc_rate_bits(rate):
    """tc's rate words (1gbit, 500mbit, 40mbit, 10kbit, 100bit) -> bits per second."""
    m = re.fullmatch(r"([\d.]+)\s*([kmgt]?)(bit|bps)", rate.strip().lower())
    if not m:
        raise ValueError(f"link rate {rate!r}: give it as tc does (1gbit, 500mbit)")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m.group(2)]
    return float(m.group(1)) * scale * (8 if m.group(3) == "bps" else 1)


def pycr_figures(text):
    """pycr's own report in its output -> dict (downtime s, passes, fault median/p99 us), keys only when found."""
    out = {}
    if m := DOWNTIME.search(text):
        out["reported_downtime_s"] = float(m.group(1))
    if m := PASSES.search(text):
        out["passes"] = int(m.group(1))
    if m := FAULTS.search(text):
        out["fault_median_us"], out["fault_p99_us"] = float(m.group(1)), float(m.group(2))
    report = [ln for ln in text.splitlines() if ln.startswith(("pass ", "downtime", "auto-converge"))]
    if report:
        out["report"] = report          # the per-pass lines (bytes, rates, throttle) and the summary's
    return out


def last_error(text, first=False):
    """The line that names the failure: the last error line (criu's logs: the first, its cause)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # criu cannot raise its own RLIMIT_NOFILE without CAP_SYS_RESOURCE: logged as an error, harmless
    errors = [ln for ln in lines if ("Error" in ln or ln.startswith(("pycr:", "E:"))) and "RLIMIT_NOFILE" not in ln]
    return (errors or lines or ["(no output)"])[0 if first and errors else -1][:200]


# ---------------------------------------------------------------- the two hosts

class Output(threading.Thread):
    """Everything a process prints on one pipe, read as it comes (no wait for EOF: its children may hold it)."""

    def __init__(self, pipe):
        super().__init__(daemon=True)
        self.pipe, self.lines = pipe, []
        self.start()

    def run(self):
        for line in self.pipe:
            self.lines.append(line)

    def text(self):
        return "".join(self.lines)

    def wait_for(self, word, proc, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(word in line for line in self.lines):
                return
            if proc.poll() is not None and not self.is_alive():
                break
            time.sleep(0.02)
        raise MethodFailed(f"no {word!r} from {proc.args[-1] if proc.args else '?'}: {last_error(self.text())}")


@dataclass
class Cmd:
    proc: subprocess.Popen
    out: Output
    err: Output
    started: float = field(default_factory=time.monotonic)

    def finish(self, what, timeout, log=None):
        """Wait for its exit -> monotonic time it was seen gone; MethodFailed if it failed (from log too)."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise MethodFailed(f"{what}: still running after {timeout:g} s") from None
        ended = time.monotonic()
        self.out.join(2)
        self.err.join(2)
        if self.proc.returncode:
            text = self.err.text() + self.out.text()
            if log and Path(log).exists():
                text = Path(log).read_text(errors="replace")
            raise MethodFailed(f"{what} failed (exit {self.proc.returncode}): {last_error(text, first=bool(log))}")
        return ended

    def text(self):
        return self.out.text() + self.err.text()


class Lab:
    """Two hosts (TwoHosts) with one destination namespace set that every destination command enters."""

    def __init__(self, work, link):
        self.work = work
        self.hosts = TwoHosts()
        self.hosts.setup()
        if link:
            subprocess.run(["tc", "-n", self.hosts.src_ns, "qdisc", "add", "dev", self.hosts.src_if, "root", "tbf",
                            "rate", link, "burst", "256kb", "latency", "100ms"], check=True, capture_output=True)
        holder = self.hosts.destination(["true"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while (init := self.hosts.dest_init(holder)) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if init is None:
            raise MethodFailed("the destination's namespaces did not come up")
        self.dst_init = init
        self.secret = work / "secret"
        self.secret.write_text(secrets.token_hex(32))
        self.secret.chmod(0o600)

    def _cmd(self, popen):
        return Cmd(popen, Output(popen.stdout), Output(popen.stderr))

    def src(self, argv):
        return self._cmd(self.hosts.source(list(map(str, argv)), env=ENV, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True))

    def dst(self, argv):
        """argv in the destination's network, PID and mount namespaces (all commands share them)."""
        return self._cmd(self.hosts._start(["nsenter", "-t", str(self.dst_init), "-n", "-p", "-m", "--",
                                            *map(str, argv)], env=ENV, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True))

    def counters(self):
        """(tx, rx) bytes of the source's end of the veth, from its /sys statistics."""
        path = f"/sys/class/net/{self.hosts.src_if}/statistics"
        out = subprocess.run(["ip", "netns", "exec", self.hosts.src_ns, "cat", f"{path}/tx_bytes",
                              f"{path}/rx_bytes"], capture_output=True, text=True, check=True).stdout.split()
        return int(out[0]), int(out[1])

    def listening(self, ns, port, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ss = subprocess.run(["ip", "netns", "exec", ns, "ss", "-Hltn", f"sport = :{port}"],
                                capture_output=True, text=True).stdout
            if ss.strip():
                return
            time.sleep(0.02)
        raise MethodFailed(f"nothing listens on port {port} after {timeout} s")

    def copy_dir(self, src_dir, dst_dir, timeout):
        """src_dir (source host) -> dst_dir (destination host), through the link."""
        dst_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        rx = self.dst([sys.executable, "-m", "benchmarks.linkcopy", "recv", self.hosts.dst_addr, port, dst_dir])
        rx.out.wait_for("listening", rx.proc, 30)
        tx = self.src([sys.executable, "-m", "benchmarks.linkcopy", "send", self.hosts.dst_addr, port, src_dir])
        tx.finish("image copy (send)", timeout)
        rx.finish("image copy (receive)", timeout)

    def link_check(self, nbytes=64 * MIB):
        """Measured rate of the shaped link, bytes/s (one TCP stream of zeros)."""
        port = free_port()
        rx = self.dst([sys.executable, "-m", "benchmarks.linkcopy", "recv", self.hosts.dst_addr, port, "-"])
        rx.out.wait_for("listening", rx.proc, 30)
        tx = self.src([sys.executable, "-m", "benchmarks.linkcopy", "send", self.hosts.dst_addr, port, "--bytes",
                       nbytes])
        tx.finish("link check", 120)
        rx.finish("link check", 10)
        m = re.search(r"^received (\d+) ([\d.]+)$", rx.out.text(), re.M)
        if not m:
            raise MethodFailed(f"link check: {last_error(rx.text())}")
        return int(m.group(1)) / float(m.group(2))

    def close(self):
        self.hosts.close()


def cpu_name():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def free_port():
    return 20000 + secrets.randbelow(40000)


# ---------------------------------------------------------------- the workload

class Workload:
    """dirtier in the source namespace, its lines in a file (restored by path on the destination)."""

    def __init__(self, lab, mib, rate, touch):
        self.log = lab.work / "heartbeat.txt"
        with open(self.log, "ab") as out:
            self.proc = lab.hosts.source([procs.build_workload("dirtier"), str(mib), str(rate),
                                          str(1 if touch else 0)],
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120 + mib / 50
        while not self.lines():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise MethodFailed(f"dirtier did not start: {self.log.read_text()[-200:]}")
            time.sleep(0.05)
        self.pid = self.proc.pid
        self.touch = touch
        # reaped the moment it dies, as its shell would: a dump waits for its PID to be free
        threading.Thread(target=self.proc.wait, daemon=True).start()

    def lines(self):
        return self.log.read_text().splitlines()

    def arm(self):
        if self.touch:
            os.kill(self.pid, signal.SIGUSR1)

    def wait_replica(self, since_ns, after_ns, timeout):
        """A heartbeat after after_ns (and the `touched` line when armed) -> heartbeat() since since_ns."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            gap, last_hb, touched = heartbeat(self.lines(), since_ns)
            if last_hb and last_hb > after_ns and (touched or not self.touch):
                return gap, last_hb, touched
            time.sleep(0.1)
        raise MethodFailed("the replica's heartbeat did not come back" + (" with its touch" if self.touch else ""))


# ---------------------------------------------------------------- methods

@dataclass
class Method:
    name: str
    run: object             # run(lab, workload, timeout, *args) -> dict of figures
    args: tuple = ()
    lazy: bool = False      # the replica runs before its memory is there: measure faults and touch
    needs: str = ""         # a word `pycr migrate --help` must show (modes being built)


def pycr(*args):
    return [sys.executable, "-m", "pycr", *args]


def run_pycr_migrate(lab, wl, timeout, *mode):
    port = free_port()
    work = lab.work / "dst-work"
    serve = lab.dst(pycr("serve", "--listen", f"{lab.hosts.dst_addr}:{port}", "--secret-file", lab.secret, "--once",
                         "-W", work))
    serve.out.wait_for("listening on", serve.proc, 60)
    t0 = time.monotonic()
    m = lab.src(pycr("migrate", "-t", wl.pid, "--to", f"{lab.hosts.dst_addr}:{port}", "--secret-file", lab.secret,
                     *mode))
    try:
        ended = m.finish("pycr migrate", timeout)
        serve.finish("pycr serve", 60)
    finally:        # both sides' words, kept with --logs
        (lab.work / "migrate.log").write_text(m.text())
        (lab.work / "serve.log").write_text(serve.text())
    return dict(total_s=ended - t0, **pycr_figures(m.text() + serve.text()))


def run_pycr_lazy(lab, wl, timeout):
    port = free_port()
    simg, dimg = lab.work / "src-img", lab.work / "dst-img"
    t0 = time.monotonic()
    src = lab.src(pycr("dump", "-t", wl.pid, "-D", simg, "--lazy-pages", "--address", lab.hosts.src_addr,
                       "--port", port, "--secret-file", lab.secret))
    src.out.wait_for("serving lazy pages on", src.proc, timeout)
    lab.copy_dir(simg, dimg, timeout)
    daemon = lab.dst(pycr("lazy-pages", "-D", dimg, "--page-server", "--address", lab.hosts.src_addr,
                          "--port", port, "--secret-file", lab.secret))
    sock = dimg / "lazy-pages.sock"
    deadline = time.monotonic() + 30
    while not sock.exists():
        if daemon.proc.poll() is not None or time.monotonic() > deadline:
            raise MethodFailed(f"pycr lazy-pages did not start: {last_error(daemon.text())}")
        time.sleep(0.02)
    running = lab.dst(pycr("restore", "-D", dimg, "-d", "--lazy-pages")).finish("pycr restore", timeout)
    ended = max(daemon.finish("pycr lazy-pages", timeout), src.finish("pycr dump --lazy-pages", timeout))
    return dict(total_s=ended - t0, tool_downtime_s=running - t0, **pycr_figures(daemon.text()))


def run_criu_page_server(lab, wl, timeout):
    port = free_port()
    simg, dimg = lab.work / "src-img", lab.work / "dst-img"
    simg.mkdir()
    dimg.mkdir()
    server = lab.dst([CRIU, "page-server", "-D", dimg, "--address", lab.hosts.dst_addr, "--port", port,
                      "-o", lab.work / "page-server.log"])
    lab.listening(lab.hosts.dst_ns, port)
    t0 = time.monotonic()
    lab.src([CRIU, "dump", "-t", wl.pid, "-D", simg, "--shell-job", "--page-server", "--address",
             lab.hosts.dst_addr, "--port", port, "-o", lab.work / "dump.log"]).finish("criu dump", timeout, lab.work / "dump.log")
    server.finish("criu page-server", 30, lab.work / "page-server.log")
    lab.copy_dir(simg, dimg, timeout)
    running = lab.dst([CRIU, "restore", "-D", dimg, "-d", "--shell-job", "-o", lab.work / "restore.log"]) \
        .finish("criu restore", timeout, lab.work / "restore.log")
    return dict(total_s=running - t0, tool_downtime_s=running - t0)


def run_criu_lazy(lab, wl, timeout):
    port = free_port()
    simg, dimg = lab.work / "src-img", lab.work / "dst-img"
    simg.mkdir()
    t0 = time.monotonic()
    src = lab.src([CRIU, "dump", "-t", wl.pid, "-D", simg, "--shell-job", "--lazy-pages", "--address",
                   lab.hosts.src_addr, "--port", port, "-o", lab.work / "dump.log"])
    lab.listening(lab.hosts.src_ns, port, timeout)
    lab.copy_dir(simg, dimg, timeout)
    daemon = lab.dst([CRIU, "lazy-pages", "-D", dimg, "--page-server", "--address", lab.hosts.src_addr,
                      "--port", port, "-o", lab.work / "lazy-pages.log"])
    time.sleep(0.5)     # criu lazy-pages gives no sign that its socket is ready
    try:
        running = lab.dst([CRIU, "restore", "-D", dimg, "-d", "--shell-job", "--lazy-pages",
                           "-o", lab.work / "restore.log"]).finish("criu restore --lazy-pages", timeout,
                                                                    lab.work / "restore.log")
    except MethodFailed as exc:     # the cause is usually on the source: say it first
        try:
            src.finish("criu dump --lazy-pages", 30, lab.work / "dump.log")
        except MethodFailed as cause:
            raise MethodFailed(f"{cause} (then {exc})") from None
        raise
    ended = max(daemon.finish("criu lazy-pages", timeout, lab.work / "lazy-pages.log"),
                src.finish("criu dump --lazy-pages", timeout, lab.work / "dump.log"))
    return dict(total_s=ended - t0, tool_downtime_s=running - t0)


METHODS = [
    Method("pycr-precopy", run_pycr_migrate),
    # the same with a downtime budget: the policy switches when the rest fits, and throttles a
    # tree that dirties faster than the link carries (auto-converge)
    Method("pycr-precopy-300ms", run_pycr_migrate, ("--downtime-limit", "300"), needs="--downtime-limit"),
    Method("pycr-postcopy", run_pycr_migrate, ("--mode", "post-copy"), lazy=True, needs="--mode"),
    Method("pycr-hybrid", run_pycr_migrate, ("--mode", "hybrid"), lazy=True, needs="--mode"),
    Method("pycr-hybrid-300ms", run_pycr_migrate, ("--mode", "hybrid", "--downtime-limit", "300"), lazy=True,
           needs="--mode"),
    Method("pycr-lazy", run_pycr_lazy, lazy=True),
    Method("criu-pageserver", run_criu_page_server),
    Method("criu-lazy", run_criu_lazy, lazy=True),
]


def unavailable(method):
    """None when the method can run here, else one line saying why not."""
    if method.name.startswith("criu"):
        if not os.access(CRIU, os.X_OK):
            return f"criu not found at {CRIU} (set CRIU= or run scripts/build-criu.sh)"
        if method.lazy:
            check = subprocess.run([CRIU, "check", "--feature", "uffd-noncoop"], capture_output=True, text=True)
            if check.returncode:
                return f"`criu check --feature uffd-noncoop`: {last_error(check.stdout + check.stderr)}"
    if method.needs:
        helptext = subprocess.run(pycr("migrate", "--help"), capture_output=True, text=True, env=ENV).stdout
        if method.needs not in helptext:
            return f"this pycr's migrate has no {method.needs} yet"
    return None


# ---------------------------------------------------------------- one run

def run_one(method, mib, rate, link, timeout, logs=None):
    """A fresh pair of hosts and workload, one migration -> dict of figures (with "error" when it failed)."""
    work = Path(tempfile.mkdtemp(prefix="pycr-netbench-"))
    lab = None
    row = dict(method=method.name, mib=mib, rate_pct=rate, link=link)
    try:
        lab = Lab(work, link)
        wl = Workload(lab, mib, rate, touch=method.lazy)
        time.sleep(1.0)                      # the dirty rate settles; the page cache of the start is gone
        before = lab.counters()
        since = time.monotonic_ns()
        wl.arm()
        row.update(method.run(lab, wl, timeout, *method.args))
        done = time.monotonic_ns()
        gap, _, touched = wl.wait_replica(since, done, timeout=60 + mib / 10)
        row["bytes"] = veth_delta(before, lab.counters())
        row["heartbeat_downtime_s"] = gap
        if touched:
            row["touch_bytes_per_s"] = touched[0] / touched[1]
    except MethodFailed as exc:
        row["error"] = str(exc)
    finally:
        if lab:
            lab.close()
        if logs:        # criu's logs, pycr's output and the heartbeat, kept for a failure's whole story
            keep = Path(logs) / f"{method.name}-{mib}-{rate:g}-{time.strftime('%H%M%S')}"
            keep.mkdir(parents=True, exist_ok=True)
            for f in [*work.glob("*.log"), *work.glob("*.txt")]:
                shutil.copy(f, keep)
        shutil.rmtree(work, ignore_errors=True)
    return row


# ---------------------------------------------------------------- report

def summarize(rows):
    """Rows of one (method, size, rate) -> medians of every figure, with the errors kept."""
    out = {k: rows[0][k] for k in ("method", "mib", "rate_pct", "link")}
    good = [r for r in rows if "error" not in r]
    out["rounds"], out["failed"] = len(good), len(rows) - len(good)
    for key in ("reported_downtime_s", "tool_downtime_s", "heartbeat_downtime_s", "total_s", "bytes",
                "fault_median_us", "fault_p99_us", "touch_bytes_per_s", "passes"):
        vals = [r[key] for r in good if key in r]
        if vals:
            out[key] = statistics.median(vals)
    errors = [r["error"] for r in rows if "error" in r]
    if errors:
        out["error"] = errors[-1]
    return out


def _f(v, fmt, scale=1.0):
    return "-" if v is None else format(v * scale, fmt)


def format_table(summaries):
    head = ("| method | MiB | %/s | downtime (tool) ms | downtime (heartbeat) ms | total s | MiB sent | "
            "fault med/p99 us | touch MiB/s |")
    lines = [head, "|" + "---|" * 9]
    notes = []
    for s in summaries:
        if not s["rounds"]:
            notes.append(f"{s['method']} {s['mib']} MiB {s['rate_pct']:g} %/s: {s.get('error', 'no result')}")
            continue
        tool = s.get("reported_downtime_s", s.get("tool_downtime_s"))
        faults = "-" if "fault_median_us" not in s else f"{s['fault_median_us']:.0f}/{s['fault_p99_us']:.0f}"
        lines.append(f"| {s['method']} | {s['mib']} | {s['rate_pct']:g} | {_f(tool, '.0f', 1e3)} | "
                     f"{_f(s.get('heartbeat_downtime_s'), '.0f', 1e3)} | {_f(s.get('total_s'), '.2f')} | "
                     f"{_f(s.get('bytes'), '.1f', 1 / MIB)} | {faults} | "
                     f"{_f(s.get('touch_bytes_per_s'), '.1f', 1 / MIB)} |")
        if s["failed"]:
            notes.append(f"{s['method']}: {s['failed']} round(s) failed: {s['error']}")
    return "\n".join(lines + [""] + notes)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="256", help="MiB of the workload, comma-separated (the issue: 2048)")
    ap.add_argument("--rates", default="1,20", help="percent of its pages written per second, comma-separated")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--link", default="1gbit", help="tc tbf rate of the veth (empty: unshaped)")
    ap.add_argument("--methods", default=",".join(m.name for m in METHODS))
    ap.add_argument("--timeout", type=float, default=600, help="seconds one command may take")
    ap.add_argument("--json", help="write every round and the medians here")
    ap.add_argument("--logs", help="keep each run's criu logs, pycr output and heartbeat in this directory")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("net_migrate: network namespaces need root")
    wanted = args.methods.split(",")
    unknown = set(wanted) - {m.name for m in METHODS}
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; known: {[m.name for m in METHODS]}")
    sizes = [int(s) for s in args.sizes.split(",")]
    rates = [float(r) for r in args.rates.split(",")]
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    methods, skipped = [], {}
    for m in METHODS:
        if m.name in wanted:
            why = unavailable(m)
            if why:
                skipped[m.name] = why
                print(f"{m.name}: skipped: {why}")
            else:
                methods.append(m)
    machine = compare.machine_line()
    link_rate = None
    lab = Lab(Path(tempfile.mkdtemp(prefix="pycr-netbench-")), args.link)
    try:
        link_rate = lab.link_check()
    except MethodFailed as exc:
        print(f"link check failed: {exc}")
    finally:
        lab.close()
        shutil.rmtree(lab.work, ignore_errors=True)
    link = f"{args.link or 'unshaped'} (tbf; one TCP stream measured {_f(link_rate, '.0f', 8 / 1e6)} Mbit/s)"
    print(f"{machine}\nlink: {link}\n")

    rows = []
    try:
        for mib in sizes:
            for rate in rates:
                for rnd in range(args.rounds):
                    order = methods if rnd % 2 == 0 else methods[::-1]
                    for m in order:
                        row = run_one(m, mib, rate, args.link, args.timeout, args.logs)
                        row["round"] = rnd
                        rows.append(row)
                        print(f"  {m.name} {mib} MiB {rate:g} %/s round {rnd + 1}: "
                              + (row["error"] if "error" in row else
                                 f"heartbeat downtime {row['heartbeat_downtime_s'] * 1e3:.0f} ms, "
                                 f"total {row['total_s']:.2f} s"), flush=True)
    except KeyboardInterrupt:
        print("interrupted: what ran so far follows")
    groups = {}
    for r in rows:
        groups.setdefault((r["method"], r["mib"], r["rate_pct"]), []).append(r)
    summaries = [summarize(g) for g in groups.values()]
    print()
    print(format_table(summaries))
    for name, why in skipped.items():
        print(f"{name}: skipped: {why}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": machine, "cpu": cpu_name(),
             "kernel": platform.release(), "link": args.link, "link_measured_bytes_per_s": link_rate,
             "date": datetime.now(timezone.utc).isoformat(), "skipped": skipped,
             "summaries": summaries, "rounds": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
