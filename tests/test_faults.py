"""pycr killed at its steps: the tree it touched goes on as it was.

Each command is run once with PYCR_COUNT_STEPS to learn its steps, then again
with PYCR_STOP_AT_STEP=N for a spread of N (every kind of step, injected
syscalls included), and pycr is sent SIGKILL, SIGTERM or SIGINT there. After
each trial: the source tree runs untraced, keeps counting, its blocked mask,
maps and fds are as before; a restore leaves no task and no stub behind.
What only a SIGKILL can leave (pycr's userfaultfd, its trampoline) is listed
by `pycr check -t` and taken out by `pycr cleanup -t`.
"""

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import sys

import pytest

import procutil
from pycrcmd import pycr, stopped_at_step

SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)


def steps_of(tmp_path, *args):
    """[(n, name)] of the steps `pycr ARGS` goes through."""
    count = tmp_path / "steps"
    count.unlink(missing_ok=True)
    env = dict(os.environ, PYCR_COUNT_STEPS=str(count))
    done = subprocess.run([sys.executable, "-m", "pycr", *map(str, args)], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = count.read_text().splitlines()
    steps_of.stdout = done.stdout
    return [(int(n), name) for n, _, name in (line.partition(" ") for line in lines)]


def replica_pids(migrate_stdout):
    """The real PIDs of a migrated replica's root and namespace init, from `pycr migrate`'s summary."""
    m = re.search(r"root pid \d+ \(pid (\d+) outside its namespace, namespace init (\d+)\)", migrate_stdout)
    assert m, migrate_stdout
    return int(m.group(1)), int(m.group(2))


def spread(steps, most=8):
    """Steps of every kind, and injected syscalls spread over the run."""
    picked, kinds = [], set()
    for n, name in steps:
        kind = " ".join(name.split()[:2]) if name.startswith("inject") else name.split()[0]
        if kind not in kinds:
            kinds.add(kind)
            picked.append(n)
    injects = [n for n, name in steps if name.startswith("inject")]
    picked += injects[len(injects) // 3::max(1, len(injects) // 3)]
    picked = sorted(set(picked))
    stride = max(1, len(picked) // most)
    picked = picked[::stride]
    if steps and steps[-1][0] not in picked:
        picked.append(steps[-1][0])
    return picked


def stop_and_signal(n, sig, *args, trial="", env=None):
    """Run pycr ARGS until it stops at step n, send it sig; -> (returncode, stderr)."""
    with stopped_at_step(n, *args, env=dict(env or {}, PYCR_FAULT_TRIAL=str(trial))) as (p, first):
        p.send_signal(sig)
        rest = p.stderr.read()
        rc = p.wait(timeout=60)
    return rc, first + rest


def stubs(trial):
    """PIDs of pycr-stub processes started by the pycr of this trial (a replica's namespace
    init keeps that name; a stub inherits pycr's environment, which names the trial)."""
    out = []
    for p in procutil.all_pids():
        if (procutil.stat(p) or {}).get("comm") != "pycr-stub":
            continue
        try:
            with open(f"/proc/{p}/environ", "rb") as f:
                if f"PYCR_FAULT_TRIAL={trial}".encode() in f.read().split(b"\0"):
                    out.append(p)
        except OSError:
            pass
    return out


PR_SET_CHILD_SUBREAPER = 36


@contextlib.contextmanager
def adopting_orphans():
    """This process as a child subreaper for the block: the tasks a killed pycr leaves are
    re-parented here instead of to init, so procutil.wait_gone reaps each as soon as it
    dies (init may reap only every second or two)."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0, os.strerror(ctypes.get_errno())
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def snapshot(pid):
    return dict(maps=procutil.coalesced_maps(pid), fds=procutil.fds(pid),
                sigblk=procutil.status(pid)["SigBlk"])


def assert_goes_on(w, before, sig, where):
    """The tree runs untraced and counts on; after SIGKILL pycr's leftovers are only
    what `pycr check -t` lists, and `pycr cleanup -t` removes them."""
    procutil.assert_running_untraced(w.pid)
    mark = w.mark()
    w.wait_for(r"^count [\d ]+$", start=mark, timeout=5)
    now = snapshot(w.pid)
    if sig == signal.SIGKILL:
        listed = pycr("check", "-t", w.pid, expect=None)
        if now != before:
            assert listed.returncode == 3 and "pycr's" in listed.stdout, where
        if listed.returncode == 3:
            pycr("cleanup", "-t", w.pid)
            now = snapshot(w.pid)
    assert now == before, f"{where}: the tree changed"
    assert pycr("check", "-t", w.pid).stdout.startswith("nothing of pycr's"), where
    procutil.assert_running_untraced(w.pid)


@pytest.mark.time_limit(400)
@pytest.mark.parametrize("command", ["dump", "pre-dump"])
def test_killed_dump_leaves_the_tree_running(spawn, tmp_path, command):
    w = spawn("threads")
    w.wait_for(r"^count [\d ]+$")
    extra = ["-R"] if command == "dump" else []
    steps = steps_of(tmp_path, command, "-t", w.pid, "-D", tmp_path / "count", *extra)
    assert any(name.startswith("inject") for _, name in steps)
    # A completed pre-dump leaves its tracker by design: the reference is the tree after one.
    before = snapshot(w.pid) if command == "dump" else None
    trial = 0
    for n in spread(steps):
        for sig in SIGNALS:
            trial += 1
            if before is None:
                pycr("cleanup", "-t", w.pid)
                before = snapshot(w.pid)
            rc, err = stop_and_signal(n, sig, command, "-t", w.pid, "-D", tmp_path / f"t{trial}", *extra)
            where = f"{command} stopped at step {n} ({dict(steps)[n]}), {sig.name}"
            if sig == signal.SIGKILL:
                assert rc == -signal.SIGKILL, where
            else:
                said = "after the dump was complete" if dict(steps)[n] == "the set is sealed" else "interrupted by"
                assert rc == 128 + sig and said in err and "Traceback" not in err, f"{where}: {err}"
            assert_goes_on(w, before, sig, where)


def test_a_cleanup_right_after_a_killed_injection_leaves_the_tree_running(spawn, tmp_path, caplog):
    """pycr killed inside an injected syscall: the task finishes the call and rt_sigreturns by itself,
    a few instructions later. A cleanup that freezes it sooner (the Python API, with no interpreter
    to start first) finds a thread inside pycr's trampoline: it is run out of it before the trampoline
    is wiped, never wiped under it (the thread would execute zeros and die of SIGSEGV)."""
    import logging
    from pycr import leftovers
    w = spawn("threads")
    w.wait_for(r"^count [\d ]+$")
    steps = steps_of(tmp_path, "dump", "-t", w.pid, "-D", tmp_path / "count", "-R")
    injects = [n for n, name in steps if name.startswith("inject")][:12]
    caplog.set_level(logging.INFO, logger="pycr")
    for trial, n in enumerate(injects * 2):
        rc, _ = stop_and_signal(n, signal.SIGKILL, "dump", "-t", w.pid, "-D", tmp_path / f"t{trial}", "-R")
        assert rc == -signal.SIGKILL
        found = leftovers.cleanup(w.pid)
        assert [x.what for x in found] == ["trampoline"], found
        assert not leftovers.find(w.pid)
        procutil.assert_running_untraced(w.pid)
    mark = w.mark()
    w.wait_for(r"^count [\d ]+$", start=mark, timeout=5)
    ran_out = [r for r in caplog.records if "ran on out of the syscall trampoline" in r.getMessage()]
    print(f"{len(ran_out)} of {len(injects) * 2} cleanups found a thread inside the trampoline")


OBJECTS = """#!{python}
import os, select, socket, sys, time
st = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
def report(line):
    os.write(st, (line + "\\n").encode())
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()
report("port %d" % listener.getsockname()[1])
conn, _ = listener.accept()
a, b = socket.socketpair()
a.send(b"queued in a unix pair")
counter = os.eventfd(3)
timer_ep = select.epoll()
timer_ep.register(conn.fileno(), select.EPOLLIN)
report("ready %d" % os.getpid())
n = 0
while True:
    for fd, ev in timer_ep.poll(0.01):
        data = conn.recv(100)
        conn.sendall(b"echo " + data)
    n += 1
    if n % 5 == 0:
        report("count %d" % n)
"""


@pytest.mark.time_limit(400)
def test_killed_dump_of_sockets_and_event_fds_leaves_them_working(spawn, tmp_path):
    """TCP repair mode, peeked unix queues, epoll: a killed `dump -R --tcp-established` leaves
    the connection to a client outside the tree working (after `pycr cleanup` for a SIGKILL)."""
    script = tmp_path / "objects.py"
    script.write_text(OBJECTS.replace("{python}", sys.executable))
    script.chmod(0o755)
    w = spawn(str(script), ready=False)
    port = int(w.wait_for(r"^port (\d+)$").group(1))
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        w.wait_for(rf"^ready {w.pid}$")

        def echo(what):
            client.sendall(what)
            assert client.recv(100) == b"echo " + what, what

        echo(b"before")
        args = ("dump", "-R", "--tcp-established", "-t", w.pid)
        steps = steps_of(tmp_path, *args, "-D", tmp_path / "count")
        echo(b"after a whole dump -R")
        before = snapshot(w.pid)
        trial = 0
        for n in spread(steps):
            for sig in SIGNALS:
                trial += 1
                stop_and_signal(n, sig, *args, "-D", tmp_path / f"t{trial}")
                where = f"dump stopped at step {n} ({dict(steps)[n]}), {sig.name}"
                assert_goes_on(w, before, sig, where)
                echo(f"trial {trial}".encode())

@pytest.mark.time_limit(300)
def test_killed_restore_leaves_no_task(spawn, tmp_path, cleanup_pids):
    w = spawn("tree")
    pids = w.pids()
    w.wait_for(r"^count [\d ]+$")
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img")
    assert not procutil.wait_gone(pids)
    steps = steps_of(tmp_path, "restore", "-D", tmp_path / "img", "-d")
    cleanup_pids.add(*pids)
    for pid in pids:
        procutil.kill(pid)
    assert not procutil.wait_gone(pids)
    with adopting_orphans():
        for n in spread(steps[:-1]):        # the last step is the release: the tree then runs
            for sig in SIGNALS:
                rc, err = stop_and_signal(n, sig, "restore", "-D", tmp_path / "img", "-d")
                where = f"restore stopped at step {n} ({dict(steps)[n]}), {sig.name}"
                assert rc != 0, where
                # every task of the restore held one of the dumped PIDs (the root stub too);
                # a dead one is reaped here, a live one stays in /proc
                assert not procutil.wait_gone(pids, timeout=5), f"{where}: restored tasks left behind"
        # and the set still restores (the restored tree is then this process's to reap at teardown)
        pycr("restore", "-D", tmp_path / "img", "-d")
    w.wait_for(r"^count [\d ]+$", start=w.mark())


@pytest.mark.time_limit(400)
def test_killed_migrate_leaves_the_source_running(spawn, tmp_path, cleanup_pids):
    w = spawn("counter")
    w.wait_for(r"^count [\d ]+$")
    work = tmp_path / "count"
    steps = steps_of(tmp_path, "migrate", "-t", w.pid, "--work-dir", work)
    # the migrated replica replaced the source: kill it, start a new source
    cleanup_pids.add(*replica_pids(steps_of.stdout))
    w = spawn("counter")
    w.wait_for(r"^count [\d ]+$")
    before = None
    # pycr's temporary work directories go to a TMPDIR of this test's own
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {"TMPDIR": str(tmpdir)}
    killed_left, swept = set(), set()
    release = max(n for n, name in steps if name == "release the restored tree")
    for n in [s for s in spread(steps) if s < release]:
        for sig in (signal.SIGKILL, signal.SIGTERM):
            if before is None:
                before = snapshot(w.pid)
            tmp_before = set(os.listdir(tmpdir))
            trial = f"{os.getpid()}-{n}-{sig}"
            rc, err = stop_and_signal(n, sig, "migrate", "-t", w.pid, trial=trial, env=env)
            where = f"migrate stopped at step {n} ({dict(steps)[n]}), {sig.name}"
            assert rc != 0, where
            assert_goes_on(w, before, sig, where)
            assert not procutil.wait_gone(stubs(trial), timeout=5), f"{where}: replica left"
            if sig == signal.SIGKILL:
                killed_left |= set(os.listdir(tmpdir)) - tmp_before
            else:
                left = set(os.listdir(tmpdir)) - tmp_before
                assert not left, f"{where}: left {left} in TMPDIR"
                # the work directory a SIGKILLed migrate left was swept by this one
                assert not killed_left & set(os.listdir(tmpdir)), where
                swept |= killed_left
                killed_left = set()
    # What a SIGKILL left in TMPDIR goes with the next migrate, which also succeeds.
    done = subprocess.run([sys.executable, "-m", "pycr", "migrate", "-t", str(w.pid)], env=dict(os.environ, **env),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    cleanup_pids.add(*replica_pids(done.stdout))
    assert os.listdir(tmpdir) == []
    assert swept, "no SIGKILLed migrate left a work directory to sweep"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stop_signal_after_the_set_is_sealed_says_so(spawn, tmp_path, cleanup_pids, sig):
    """A signal once the images are complete undoes nothing; stopped before the kill, the
    dump lets the tree go on (the safe side), and pycr says both."""
    w = spawn("counter")
    w.wait_for(r"^count 3$")
    steps = steps_of(tmp_path, "dump", "-t", w.pid, "-D", tmp_path / "count", "-R")
    sealed = next(n for n, name in steps if name == "the set is sealed")
    rc, err = stop_and_signal(sealed, sig, "dump", "-t", w.pid, "-D", tmp_path / "img")
    assert rc == 128 + sig
    assert err.splitlines()[-1] == (f"pycr: {sig.name} after the dump was complete: nothing was undone; "
                                    f"the images in {tmp_path / 'img'} are whole; the tree goes on")
    procutil.assert_running_untraced(w.pid)
    w.wait_for(r"^count \d+$", start=w.mark())
    procutil.kill(w.pid)
    assert not procutil.wait_gone([w.pid])
    mark = w.mark()
    cleanup_pids.add(w.pid)
    pycr("restore", "-D", tmp_path / "img", "-d")
    w.wait_for(r"^count \d+$", start=mark)
