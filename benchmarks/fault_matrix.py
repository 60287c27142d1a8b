"""The fault-injection matrix: pycr stopped at each of its steps and signalled there.

For each command (dump -R, pre-dump, restore, migrate) x signal (SIGKILL, SIGTERM,
SIGINT) x step (PYCR_COUNT_STEPS lists them; PYCR_STOP_AT_STEP=N stops pycr at the
N-th, see pycr/steps.py), one trial. After each trial:
- dump, pre-dump, migrate: did the source tree survive (running, untraced, still
  counting, and its maps, fds and SigBlk as before the trial), and what did
  `pycr check -t` list as left behind (taken out with `pycr cleanup -t` before the
  next trial, so that every trial starts from the same tree);
- restore, migrate: tasks left behind (restored PIDs, stubs, replica tasks) once
  pycr has exited.

Not a timed test: a script, run by hand (as root):
    python benchmarks/fault_matrix.py [--steps dump=all,pre-dump=30,restore=30,migrate=20]
It prints a markdown table and writes benchmarks/results/fault-matrix.json.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import procutil                                  # noqa: E402  (the tests' independent /proc readers)
import workloads as workload_sources             # noqa: E402

SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
COMMANDS = ("dump", "pre-dump", "restore", "migrate")
DEFAULT_STEPS = {"dump": 0, "pre-dump": 30, "restore": 30, "migrate": 20}   # 0: every step


def pycr(*args, env=None, check=True, timeout=120):
    p = subprocess.run([sys.executable, "-m", "pycr", *map(str, args)], env=env, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"pycr {' '.join(map(str, args))}: exit {p.returncode}: {p.stderr.strip()}")
    return p


class Tree:
    """A workload started in its own session, reporting to a status file."""

    def __init__(self, binary, workdir, name):
        self.status = os.path.join(workdir, f"{name}-{time.monotonic_ns()}.status")
        self.proc = subprocess.Popen([binary, self.status], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.proc.pid
        self.wait_for(lambda line: line == f"ready {self.pid}")

    def lines(self):
        try:
            with open(self.status, "rb") as f:
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return []
        return text.rpartition("\n")[0].splitlines()

    def wait_for(self, match, start=0, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(match(line) for line in self.lines()[start:]):
                return True
            time.sleep(0.01)
        return False

    def counting(self, timeout=5.0):
        mark = len(self.lines())
        return self.wait_for(lambda line: line.startswith("count "), start=mark, timeout=timeout)

    def kill(self):
        pids = [self.pid, *procutil.descendants(self.pid)] if procutil.exists(self.pid) else []
        for pid in pids:
            procutil.kill(pid)
        procutil.wait_gone(pids)
        self.proc.poll()


def snapshot(pid):
    st = procutil.status(pid)
    return dict(maps=procutil.coalesced_maps(pid), fds=procutil.fds(pid), sigblk=st and st["SigBlk"])


def running_untraced(pid):
    try:
        procutil.assert_running_untraced(pid)
        return True
    except AssertionError:
        return False


def steps_of(workdir, *args):
    count = os.path.join(workdir, "steps")
    if os.path.exists(count):
        os.unlink(count)
    done = pycr(*args, env=dict(os.environ, PYCR_COUNT_STEPS=count))
    with open(count) as f:
        steps = [(int(n), name) for n, _, name in (line.rstrip("\n").partition(" ") for line in f)]
    return steps, done.stdout


def pick(steps, most):
    """Every step (most == 0), else `most` steps spread evenly, the first and last included."""
    if not most or most >= len(steps):
        return [n for n, _ in steps]
    stride = (len(steps) - 1) / (most - 1)
    return sorted({steps[round(i * stride)][0] for i in range(most)})


def stop_and_signal(n, sig, args):
    """Run pycr ARGS until it stops at step n, send it sig -> (returncode, stderr, stopped)."""
    env = dict(os.environ, PYCR_STOP_AT_STEP=str(n))
    p = subprocess.Popen([sys.executable, "-m", "pycr", *map(str, args)], env=env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = p.stderr.readline()
        stopped = first.startswith(f"pycr: stopped at step {n} ")
        if stopped:
            p.send_signal(sig)
        out, rest = p.communicate(timeout=120)
        return p.returncode, first + rest, stopped, out
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def leftovers(pid):
    """What `pycr check -t` lists (one line each), then taken out with `pycr cleanup -t`."""
    listed = pycr("check", "-t", pid, check=False)
    if listed.returncode != 3:
        return []
    found = [line for line in listed.stdout.splitlines() if line.startswith("pid ")]
    pycr("cleanup", "-t", pid, check=False)
    return found


def stub_like():
    """PIDs of restore stubs and of tasks in a child PID namespace (replicas)."""
    out = set()
    for pid in procutil.all_pids():
        st = procutil.status(pid)
        if st is None:
            continue
        if st.get("Name") == "pycr-stub" or len(st.get("NSpid", "").split()) > 1:
            out.add(pid)
    return out


def kill_pids(pids):
    for pid in pids:
        try:
            procutil.kill(pid)
        except ValueError:
            pass
    procutil.wait_gone(pids, timeout=10)


def new_tasks(before, expected_pids=()):
    """Tasks created by the trial that still run 5 s after pycr exited -> (live, zombies).
    Zombies are dead tasks whose parent (pycr, dead) left them to PID 1 to reap."""
    deadline = time.monotonic() + 5
    while True:
        left = (stub_like() - before) | {p for p in expected_pids if procutil.exists(p)}
        live = sorted(p for p in left if procutil.state(p) not in (None, "Z", "X"))
        if not live or time.monotonic() >= deadline:
            return live, sorted(p for p in left if procutil.state(p) == "Z")
        time.sleep(0.02)


def trial_source(tree, n, sig, args, baseline):
    rc, err, stopped, _ = stop_and_signal(n, sig, args)
    survived = procutil.exists(tree.pid) and running_untraced(tree.pid) and tree.counting()
    same = survived and snapshot(tree.pid) == baseline
    found = leftovers(tree.pid) if survived else []
    after_cleanup = survived and snapshot(tree.pid) == baseline
    return dict(rc=rc, stopped=stopped, survived=bool(survived), same_state=bool(same), leftovers=found,
                same_after_cleanup=bool(after_cleanup), error=err.strip().splitlines()[-1:] if err else [])


def run_source_command(command, binaries, workdir, most, results):
    tree = Tree(binaries["threads"], workdir, command)
    try:
        tree.counting()
        extra = ["-R"] if command == "dump" else []
        steps, _ = steps_of(workdir, command, "-t", tree.pid, "-D", os.path.join(workdir, f"{command}-count"),
                            *extra)
        leftovers(tree.pid)               # a completed pre-dump leaves its tracker by design
        baseline = snapshot(tree.pid)
        names = dict(steps)
        results.total[command] = len(steps)
        for i, n in enumerate(pick(steps, most)):
            for sig in SIGNALS:
                d = os.path.join(workdir, f"{command}-{n}-{sig.name}")
                r = trial_source(tree, n, sig, [command, "-t", tree.pid, "-D", d, *extra], baseline)
                r.update(command=command, step=n, step_name=names[n], signal=sig.name)
                results.append(r)
                shutil.rmtree(d, ignore_errors=True)
                if not r["survived"]:
                    print(f"  {command} step {n} {sig.name}: tree lost; starting a new one", file=sys.stderr)
                    tree.kill()
                    tree = Tree(binaries["threads"], workdir, command)
                    tree.counting()
                    baseline = snapshot(tree.pid)
                elif not r["same_after_cleanup"]:
                    baseline = snapshot(tree.pid)
            print(f"  {command}: {i + 1} steps done", file=sys.stderr, flush=True)
    finally:
        tree.kill()


def run_restore(binaries, workdir, most, results):
    tree = Tree(binaries["tree"], workdir, "restore")
    tree.counting()
    pids = [tree.pid, *procutil.descendants(tree.pid)]
    img = os.path.join(workdir, "restore-img")
    pycr("dump", "-t", tree.pid, "-D", img)
    procutil.wait_gone(pids)
    steps, _ = steps_of(workdir, "restore", "-D", img, "-d")
    kill_pids(pids)
    names = dict(steps)
    results.total["restore"] = len(steps)
    release = max(n for n, name in steps if name == "release the restored tree")
    for i, n in enumerate(pick([s for s in steps if s[0] < release], most)):
        for sig in SIGNALS:
            # a zombie an earlier trial left to PID 1 holds its PID until PID 1 reaps it
            procutil.wait_gone(pids, timeout=30)
            before = stub_like()
            rc, err, stopped, _ = stop_and_signal(n, sig, ["restore", "-D", img, "-d"])
            left, zombies = new_tasks(before, pids)
            results.append(dict(command="restore", step=n, step_name=names[n], signal=sig.name, rc=rc,
                                stopped=stopped, tasks_left=len(left), zombies_left=len(zombies),
                                error=err.strip().splitlines()[-1:] if err else []))
            kill_pids(left)
        print(f"  restore: {i + 1} steps done", file=sys.stderr, flush=True)
    # and the set still restores
    procutil.wait_gone(pids, timeout=30)
    again = pycr("restore", "-D", img, "-d", check=False)
    results.restores_after = again.returncode == 0 or again.stderr.strip()
    kill_pids(pids)


def run_migrate(binaries, workdir, most, results):
    tree = Tree(binaries["counter"], workdir, "migrate")
    tree.counting()
    before = stub_like()
    steps, _ = steps_of(workdir, "migrate", "-t", tree.pid, "--work-dir", os.path.join(workdir, "migrate-count"))
    kill_pids(sorted(stub_like() - before))
    names = dict(steps)
    results.total["migrate"] = len(steps)
    release = max(n for n, name in steps if name == "release the restored tree")
    tree = Tree(binaries["counter"], workdir, "migrate")
    try:
        tree.counting()
        baseline = snapshot(tree.pid)
        for i, n in enumerate(pick([s for s in steps if s[0] < release], most)):
            for sig in SIGNALS:
                before = stub_like()
                r = trial_source(tree, n, sig, ["migrate", "-t", tree.pid], baseline)
                left, zombies = new_tasks(before)
                r.update(command="migrate", step=n, step_name=names[n], signal=sig.name, tasks_left=len(left),
                         zombies_left=len(zombies))
                results.append(r)
                kill_pids(left)
                if not r["survived"]:
                    tree.kill()
                    tree = Tree(binaries["counter"], workdir, "migrate")
                    tree.counting()
                    baseline = snapshot(tree.pid)
                elif not r["same_after_cleanup"]:
                    baseline = snapshot(tree.pid)
            print(f"  migrate: {i + 1} steps done", file=sys.stderr, flush=True)
    finally:
        tree.kill()
    # what SIGKILLed migrations left in /tmp goes with the next migrate
    tree = Tree(binaries["counter"], workdir, "migrate")
    before = stub_like()
    pycr("migrate", "-t", tree.pid, check=False)
    kill_pids(sorted(stub_like() - before))
    tree.kill()


def table(results, total_steps):
    rows = ["| command | signal | steps tried / steps | trials | tree survived | state as before | "
            "left something (`pycr check -t`) | as before after `pycr cleanup` | tasks left running | "
            "zombies left to PID 1 |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for command in COMMANDS:
        for sig in SIGNALS:
            rs = [r for r in results if r["command"] == command and r["signal"] == sig.name]
            if not rs:
                continue
            steps = len({r["step"] for r in rs})
            if command == "restore":
                survived = same = left = clean = "n/a"
            else:
                survived = sum(r["survived"] for r in rs)
                same = sum(r["same_state"] for r in rs)
                left = sum(bool(r["leftovers"]) for r in rs)
                clean = sum(r["same_after_cleanup"] for r in rs)
            tasks = sum(r.get("tasks_left", 0) for r in rs) if command in ("restore", "migrate") else "n/a"
            zombies = sum(r.get("zombies_left", 0) for r in rs) if command in ("restore", "migrate") else "n/a"
            rows.append(f"| {command} | {sig.name} | {steps} / {total_steps[command]} | {len(rs)} | {survived} | "
                        f"{same} | {left} | {clean} | {tasks} | {zombies} |")
    return "\n".join(rows)


class Results(list):
    """The trials, and how many steps each command has (total)."""

    def __init__(self):
        super().__init__()
        self.total = {}
        self.restores_after = None


def save(path, results, started):
    """Write what was measured so far (after each command: a crash loses one command at most)."""
    doc = dict(cpu=cpu_name(), kernel=platform.release(), seconds=round(time.monotonic() - started),
               total_steps=results.total, restore_after_trials=results.restores_after, trials=list(results))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    return doc


def cpu_name():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default=",".join(f"{k}={v or 'all'}" for k, v in DEFAULT_STEPS.items()),
                    help="steps tried per command: dump=all,pre-dump=30,...")
    ap.add_argument("--only", nargs="*", choices=COMMANDS, default=list(COMMANDS))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "fault-matrix.json"))
    args = ap.parse_args()
    most = dict(DEFAULT_STEPS)
    for item in args.steps.split(","):
        k, _, v = item.partition("=")
        most[k] = 0 if v == "all" else int(v)
    workdir = tempfile.mkdtemp(prefix="pycr-fault-matrix-")
    binaries = workload_sources.build(os.path.join(workdir, "bin"), ("counter", "threads", "tree"))
    results = Results()
    total = results.total
    started = time.monotonic()
    try:
        for command in args.only:
            if command in ("dump", "pre-dump"):
                run_source_command(command, binaries, workdir, most[command], results)
            elif command == "restore":
                run_restore(binaries, workdir, most[command], results)
            else:
                run_migrate(binaries, workdir, most[command], results)
            save(args.out, results, started)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    doc = save(args.out, results, started)
    print(f"CPU: {doc['cpu']}, kernel {doc['kernel']}, {len(results)} trials in {doc['seconds']} s\n")
    print(table(results, total))
    bad = [r for r in results if r["command"] != "restore" and not r["same_after_cleanup"]] + \
          [r for r in results if r.get("tasks_left")]
    for r in bad:
        print(f"- {r['command']} step {r['step']} ({r['step_name']}), {r['signal']}: "
              f"survived={r.get('survived')} leftovers={r.get('leftovers')} tasks_left={r.get('tasks_left')} "
              f"zombies_left={r.get('zombies_left')} "
              f"{r['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
