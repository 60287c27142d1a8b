"""Corruption run: restore hundreds of damaged copies of a real image set and count what happens.

    python -m benchmarks.corrupt [--flips-per-file 30] [--seed 1] [--mib 8] [--json FILE] [-v]

As root. Starts tests/workloads/bigmem (MIB of seeded random memory; SIGUSR1 prints the
sum of it), dumps it twice (set A with --leave-running, then set B, which kills it), and
makes mutants of A (it answered one more SIGUSR1 in between): bit flips at random offsets of every file, truncations, deleted files,
files swapped in from B (the same process a moment later), images edited through
`pycr show --json` + `pycr encode`, and edits whose manifest is written anew (what the
owner of the directory could do; only the range checks stand then). Each mutant is
restored with `pycr restore -d` and classified:

  refused        pycr exited 1 with one line "pycr: ...", and no task holds the PID
  ran correctly  restored, and the sum of its memory is the one taken before the dump
  wrong memory   restored, and the sum differs
  crashed        pycr died or printed a traceback, or the restored task died
  hung           pycr or the restored task did not answer within the timeouts
  left a task    refused, but a task of the tree exists afterwards

Everything started is killed by PID and reaped (the script is a child subreaper).
"""

import argparse
import collections
import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESTORE_TIMEOUT = 60.0
ANSWER_TIMEOUT = 5.0
OUTCOMES = ("refused", "ran correctly", "wrong memory", "crashed", "hung", "left a task")

_libc = ctypes.CDLL(None, use_errno=True)


def pycr(*args, timeout=RESTORE_TIMEOUT):
    """Run the pycr CLI -> (returncode or None on timeout, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "pycr", *map(str, args)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None, ""


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def kill_and_reap(pid, timeout=10.0):
    """SIGKILL pid (and its descendants: the workload has none) and wait until the PID is free."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.005)
    if os.path.exists(f"/proc/{pid}"):
        raise RuntimeError(f"pid {pid} cannot be reaped")


class Workload:
    """bigmem started by us: its status file, its memory sum."""

    def __init__(self, exe, work, mib):
        self.status = work / "status"
        self.status.touch()
        self.proc = subprocess.Popen([exe, str(self.status), str(mib)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True, cwd=work)
        self.pid = self.proc.pid
        self.wait_line("ready", 0, 10)

    def lines_from(self, offset):
        with open(self.status, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace").splitlines()

    def wait_line(self, word, offset, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines_from(offset):
                if line.startswith(word + " "):
                    return line.split()[1]
            if not alive(self.pid):
                return None
            time.sleep(0.005)
        return None

    def ask_sum(self, offset, timeout=ANSWER_TIMEOUT):
        os.kill(self.pid, signal.SIGUSR1)
        return self.wait_line("sum", offset, timeout)


# ---------------------------------------------------------------- mutations

def flip(path, offset, bit):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ (1 << bit)]))


def json_edit(kind):
    """An edit of the JSON of an image of kind, as a user with an editor would make it."""
    def edit(doc, pid):
        body = doc["body"]
        if kind == "core":
            body["threads"][0]["regs"]["rip"] += 1
        elif kind == "mm":
            body["vmas"][1]["start"] += 4096
        elif kind == "pagemap":
            body["entries"][0]["vaddr"] += 4096
        elif kind == "pstree":
            body["processes"][0]["sid"] += 1
        elif kind == "files":
            body["processes"][0]["fds"][-1]["pos"] += 7
        elif kind == "inventory":
            body["root_start_time"] += 1
        elif kind == "pipes-data":
            body["pipes"].append({"pipe_id": 1, "data": "00"})
        elif kind == "manifest":
            body["files"][0]["size"] += 1
        return doc
    return edit


def resealed_edit(what):
    """Edits of a set whose manifest is then written anew: only the range checks can refuse them."""
    from pycr.restore.bounds import task_size, pid_max, nr_open

    def edit(d, pid):
        if what == "pagemap off alignment":
            pm = d.read("pagemap", str(pid))
            e = pm.entries[0]
            pm.entries[0] = (e.vaddr + 8, e.nr_pages, e.in_parent)
            d.write("pagemap", pm, str(pid))
        elif what == "pagemap run outside VMAs":
            pm = d.read("pagemap", str(pid))
            e = pm.entries[-1]
            pm.entries[-1] = (task_size() - 4096 * e.nr_pages, e.nr_pages, e.in_parent)
            d.write("pagemap", pm, str(pid))
        elif what == "pagemap runs overlapping":
            pm = d.read("pagemap", str(pid))
            if len(pm.entries) > 1:
                e0, e1 = pm.entries[0], pm.entries[1]
                pm.entries[1] = (e0.vaddr, e1.nr_pages, e1.in_parent)
            d.write("pagemap", pm, str(pid))
        elif what == "VMA above TASK_SIZE":
            mm = d.read("mm", pid)
            [v for v in mm.vmas if str(v.kind) != "vsyscall"][-1].end = task_size() + 4096
            d.write("mm", mm, pid)
        elif what == "VMAs overlapping":
            mm = d.read("mm", pid)
            mm.vmas[1].start = mm.vmas[0].start
            d.write("mm", mm, pid)
        elif what == "VMA off alignment":
            mm = d.read("mm", pid)
            mm.vmas[0].end += 100
            d.write("mm", mm, pid)
        elif what == "pid above pid_max":
            tree = d.read("pstree")
            tree.processes[0].threads = [tree.processes[0].pid, pid_max() + 5]
            d.write("pstree", tree)
        elif what == "pgid 0":
            tree = d.read("pstree")
            tree.processes[0].pgid = 0
            d.write("pstree", tree)
        elif what == "fd above nr_open":
            files = d.read("files")
            files.processes[0].fds[-1].fd = nr_open() + 1
            d.write("files", files)
        elif what == "fd repeated":
            files = d.read("files")
            files.processes[0].fds[-1].fd = files.processes[0].fds[0].fd
            d.write("files", files)
        elif what == "brk above TASK_SIZE":
            mm = d.read("mm", pid)
            mm.mm.brk = task_size() + (1 << 20)
            d.write("mm", mm, pid)
    return edit


RESEALED = ("pagemap off alignment", "pagemap run outside VMAs", "pagemap runs overlapping",
            "VMA above TASK_SIZE", "VMAs overlapping", "VMA off alignment", "pid above pid_max", "pgid 0",
            "fd above nr_open", "fd repeated", "brk above TASK_SIZE")


def kind_of(name):
    return name.split("-")[0].removesuffix(".img") if not name.startswith("pipes-data") else "pipes-data"


def mutants(a, b, rng, flips_per_file):
    """(class, file kind, description, function(dir, pid)) for every mutant of set a."""
    names = sorted(n for n in os.listdir(a) if n.endswith(".img"))
    out = []
    for name in names:
        size = os.path.getsize(a / name)
        for _ in range(flips_per_file):
            off, bit = rng.randrange(size), rng.randrange(8)
            out.append(("bit flip", kind_of(name), f"{name} byte {off} bit {bit}",
                        lambda d, pid, name=name, off=off, bit=bit: flip(d / name, off, bit)))
        for cut in sorted({0, size // 2, max(size - 1, 0)}):
            out.append(("truncation", kind_of(name), f"{name} to {cut} bytes",
                        lambda d, pid, name=name, cut=cut: os.truncate(d / name, cut)))
        out.append(("deleted", kind_of(name), f"{name} deleted", lambda d, pid, name=name: os.unlink(d / name)))
        same = (a / name).read_bytes() == (b / name).read_bytes()
        out.append(("swapped from B, same bytes" if same else "swapped from B", kind_of(name), f"{name} of set B",
                    lambda d, pid, name=name: shutil.copy(b / name, d / name)))
        if not name.startswith("pages-"):
            out.append(("JSON edit re-encoded", kind_of(name), f"{name} edited",
                        lambda d, pid, name=name: encode_edit(d / name, json_edit(kind_of(name)), pid)))
    for what in RESEALED:
        out.append(("edit + new manifest", "-", what, lambda d, pid, what=what: reseal_edit(d, pid, what)))
    return out


def encode_edit(path, edit, pid):
    proc = subprocess.run([sys.executable, "-m", "pycr", "show", str(path), "--json"], capture_output=True,
                          text=True, check=True)
    doc = edit(json.loads(proc.stdout), pid)
    src = path.with_suffix(".json.edit")
    src.write_text(json.dumps(doc))
    subprocess.run([sys.executable, "-m", "pycr", "encode", "-i", str(src), "-o", str(path)], check=True,
                   capture_output=True)
    src.unlink()


def reseal_edit(d, pid, what):
    from pycr import manifest
    from pycr.images import ImageDir
    resealed_edit(what)(ImageDir(d), pid)
    manifest.reseal(d)


# ---------------------------------------------------------------- one restore

def classify(w, imgdir, status_size, good_sum):
    """Restore imgdir and say what came of it -> (outcome, detail)."""
    with open(w.status, "r+b") as f:
        f.truncate(status_size)
    code, err = pycr("restore", "-D", imgdir, "-d")
    err_lines = err.strip().splitlines()
    try:
        if code is None:
            return "hung", "pycr restore did not return"
        if code != 0:
            if alive(w.pid) or os.path.exists(f"/proc/{w.pid}"):
                return "left a task", err_lines[-1] if err_lines else ""
            if code == 1 and len(err_lines) == 1 and err_lines[0].startswith("pycr: ") and "Traceback" not in err:
                return "refused", err_lines[0]
            return "crashed", f"exit {code}: {err_lines[-1] if err_lines else ''}"
        got = w.ask_sum(status_size)
        if got is None:
            return ("hung", "no answer to SIGUSR1") if alive(w.pid) else ("crashed", "the restored task died")
        if got != good_sum:
            return "wrong memory", f"sum {got}, expected {good_sum}"
        return "ran correctly", ""
    finally:
        kill_and_reap(w.pid)


def run(args):
    if os.geteuid() != 0:
        raise SystemExit("corrupt: run as root")
    _libc.prctl(36, 1, 0, 0, 0)          # PR_SET_CHILD_SUBREAPER: restored tasks come back to us
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="pycr-corrupt-"))
    w = None
    try:
        exe = work / "bigmem"
        src = REPO / "tests" / "workloads"
        subprocess.run(["gcc", "-O2", "-I", str(src), "-o", str(exe), str(src / "bigmem.c")], check=True)
        w = Workload(str(exe), work, args.mib)
        good = w.ask_sum(0)
        status_size = os.path.getsize(w.status)
        a, b = work / "A", work / "B"
        if pycr("dump", "-t", w.pid, "-D", a, "-R")[0] != 0:
            raise SystemExit("corrupt: dump A failed")
        w.ask_sum(status_size)      # B differs from A: a stack frame more, the status fd further on
        if pycr("dump", "-t", w.pid, "-D", b)[0] != 0:
            raise SystemExit("corrupt: dump B failed")
        kill_and_reap(w.pid)
        base = classify(w, a, status_size, good)
        print(f"unmodified set A: {base[0]}", flush=True)
        if base[0] != "ran correctly":
            raise SystemExit(f"corrupt: the unmodified set does not restore: {base[1]}")
        table = collections.defaultdict(collections.Counter)
        bad = []
        todo = mutants(a, b, rng, args.flips_per_file)
        started = time.monotonic()
        for i, (cls, kind, what, mutate) in enumerate(todo, 1):
            m = work / "M"
            shutil.rmtree(m, ignore_errors=True)
            shutil.copytree(a, m)
            mutate(m, w.pid)
            outcome, detail = classify(w, m, status_size, good)
            table[(cls, kind)][outcome] += 1
            if outcome not in ("refused", "ran correctly"):
                bad.append((cls, what, outcome, detail))
            if args.verbose:
                print(f"[{i}/{len(todo)}] {cls}: {what}: {outcome} {detail}", flush=True)
        seconds = time.monotonic() - started
    finally:
        if w is not None and os.path.exists(f"/proc/{w.pid}"):
            kill_and_reap(w.pid)
        shutil.rmtree(work, ignore_errors=True)
    report(table, bad, len(todo), seconds, args)


def report(table, bad, total, seconds, args):
    totals = collections.Counter()
    for counts in table.values():
        totals.update(counts)
    by_class = collections.defaultdict(collections.Counter)
    for (cls, _), counts in table.items():
        by_class[cls].update(counts)
    header = f"| mutation | mutants | {' | '.join(OUTCOMES)} |"
    lines = [header, "|" + "---|" * (len(OUTCOMES) + 2)]
    for cls, counts in by_class.items():
        lines.append(f"| {cls} | {sum(counts.values())} | " + " | ".join(str(counts[o]) for o in OUTCOMES) + " |")
    lines.append(f"| **all** | {total} | " + " | ".join(str(totals[o]) for o in OUTCOMES) + " |")
    print("\n".join(lines))
    print(f"{total} mutants in {seconds:.0f} s")
    for cls, what, outcome, detail in bad:
        print(f"  {outcome}: {cls}: {what}: {detail}")
    if args.json:
        doc = {"total": total, "seconds": seconds, "seed": args.seed, "mib": args.mib,
               "totals": dict(totals), "by_class": {k: dict(v) for k, v in by_class.items()},
               "by_class_and_kind": {f"{c} / {k}": dict(v) for (c, k), v in table.items()},
               "not_refused_nor_correct": bad}
        Path(args.json).write_text(json.dumps(doc, indent=2))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.corrupt", description=__doc__.splitlines()[0])
    p.add_argument("--flips-per-file", type=int, default=30)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--mib", type=int, default=8, help="memory of the workload (default 8)")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("-v", "--verbose", action="store_true")
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
