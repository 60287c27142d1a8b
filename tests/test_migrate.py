"""Incremental restore and `pycr migrate` against real processes.

The source workload runs while pre-dump passes are taken; a replica is built
in a new PID namespace from the first pass, held stopped, fixed up by every
later pass and resumed on the final dump; only then is the source killed.
Hooks of the Python API (on_image_set before a pass is applied, on_pass
after) let a test act between passes: change the source, look at the
replica, or break the migration.

Every replica task is registered with cleanup_pids as soon as it exists
(its namespace init first: killing it takes the namespace down with it).
"""

import os
import re
import signal
import subprocess
import sys
import zlib

import pytest

import procutil
from checkpointing import Follower
from kernel import require_tracker
from pycrcmd import one_line_error, pycr

from pycr.errors import PycrError
from pycr.images import ImageDir, read_memory
from pycr.migrate import migrate
from pycr.migrate.loop import Policy
from pycr.migrate.mmdiff import plan
from pycr.migrate.treediff import Node, diff

UFFD_LINK = "anon_inode:[userfaultfd]"
PASS_LINE = re.compile(r"^pass (\d+) (pre-dump|dump): \+(\d+) -(\d+) tasks(?:, \d+ re-created)?, "
                       r"(\d+) pages, (\d+) bytes, ([0-9.]+) s ")


# ---------------------------------------------------------------- helpers

def ns_tasks(init_real):
    """{pid inside the namespace: (pid outside, parent's pid inside)} of every live task under init."""
    inner = {}
    for outer in [init_real, *procutil.descendants(init_real)]:
        st = procutil.status(outer)
        if st is None or procutil.state(outer) in (None, "Z", "X"):
            continue
        inner[outer] = int(st["NSpid"].split()[-1])
    return {pid: (outer, inner.get(procutil.ppid(outer))) for outer, pid in inner.items() if outer != init_real}


def signal_and_wait(w, pid, sig, pattern):
    start = w.mark()
    procutil.kill(pid, sig)
    return w.wait_for(pattern, start=start, root=False)


def no_uffd(pid):
    return UFFD_LINK not in procutil.fds(pid).values()


def stub_children():
    """Restore stubs that are children of this test process (a replica's namespace init)."""
    from pycr.native import core
    stub = core.stub_path()
    out = []
    for pid in procutil.children(os.getpid()):
        try:
            if os.readlink(f"/proc/{pid}/exe") == stub:
                out.append(pid)
        except OSError:
            pass
    return out


def final_pstree(work_dir):
    """(pid, ppid) of every process in the final dump of a kept work dir."""
    for name in sorted(os.listdir(work_dir)):
        img = ImageDir(os.path.join(work_dir, name))
        if str(img.read("inventory").kind) == "dump":
            return {p.pid: p.ppid for p in img.read("pstree").processes}
    raise AssertionError(f"no final dump in {work_dir}")


def symbol_address(pid, binary, name):
    """Run-time address of a static variable of a PIE workload (nm offset + load base)."""
    out = subprocess.run(["nm", binary], capture_output=True, text=True, check=True).stdout
    offset = next(int(parts[0], 16) for parts in map(str.split, out.splitlines())
                  if len(parts) == 3 and parts[2] == name)
    base = min(start for start, _, _, path in procutil.maps(pid) if path == binary)
    return base + offset


def registering(cleanup_pids, seen=None, then=None):
    """An on_pass hook that registers every replica task for cleanup, then calls `then`."""
    def hook(rep, replica):
        cleanup_pids.add(*replica.reals)
        if seen is not None:
            seen.extend(r for r in replica.reals if r not in seen)
        if then is not None:
            then(rep, replica)
    return hook


def assert_source_unharmed(w, replica_reals):
    """The migration failed: the source goes on as before, nothing of the replica is left."""
    assert w.alive()
    procutil.assert_running_untraced(w.pid)
    assert no_uffd(w.pid), procutil.fds(w.pid)
    n = int(w.last("count").split()[1])
    w.wait_for(rf"^count {n + 3}$", start=w.mark() - 1)
    for real in replica_reals:
        assert not procutil.exists(real), f"replica task {real} ({procutil.state(real)}) left behind"
    assert stub_children() == []


# ---------------------------------------------------------------- the tree

def test_forker_replica_has_the_final_tree(spawn, tmp_path, cleanup_pids):
    """Workers come and go between passes; the replica ends with the final pass's tree."""
    w = spawn("forker")
    w.wait_for(r"^exit \d+ 0$")

    def between(rep, replica):
        if rep.kind != "pre-dump":
            return
        # The source forks a worker and reaps one of this pass's workers before the next
        # pass, so the passes see workers added and removed.
        mark = w.mark()
        reaped = {int(line.split()[1]) for line in w.lines()[:mark] if line.startswith("exit ")}
        workers = "|".join(str(pid) for pid in replica.tasks if pid != w.pid and pid not in reaped)
        w.wait_for(r"^fork (\d+)$", start=mark)
        if workers:
            w.wait_for(rf"^exit ({workers}) 0$", start=mark)

    def at_final(number, path):
        if path.endswith("dump") and not path.endswith("pre-dump"):
            marks.append(w.mark())      # the source is frozen: later lines are the replica's

    marks = []
    work = tmp_path / "work"
    res = migrate(w.pid, work_dir=work, policy=Policy(max_passes=5, min_delta=0),
                  on_image_set=at_final, on_pass=registering(cleanup_pids, then=between))
    init = res.summary.init_real
    got = ns_tasks(init)
    mark = marks[0]
    want = final_pstree(work)
    assert sum(r.added for r in res.reports[1:]) > 0 and sum(r.removed for r in res.reports[1:]) > 0, \
        [r.line() for r in res.reports]
    # The same PIDs inside the namespace and the same parents; the root's parent is the init.
    # A worker may have exited or been forked in the instant since the resume: the
    # replica's own lines say so. Its root writes "fork N" just after fork() and "exit N"
    # just after the reap: its second fork line after `got` was taken comes from a loop
    # round begun after that, so by then it has written both for every worker `got` saw.
    after = w.mark()
    assert procutil.wait_until(lambda: len(w.fields("fork", after)) >= 2), "the replica's root stopped forking"
    later_forks = {int(f[0]) for f in w.fields("fork", mark)}
    later_exits = {int(f[0]) for f in w.fields("exit", mark)}
    assert set(got) - set(want) <= later_forks
    assert set(want) - set(got) <= later_exits
    for pid in set(got) & set(want):
        assert got[pid][1] == (1 if pid == w.pid else want[pid]), f"pid {pid}"
    assert got[w.pid][0] == res.summary.root_real != w.pid
    assert not procutil.exists(w.pid) or procutil.state(w.pid) == "Z"
    procutil.assert_running_untraced(res.summary.root_real)
    # Workers of the final pass go on counting, and the forker goes on forking and reaping.
    for pid in set(want) - {w.pid} - later_exits:
        w.wait_for(rf"^(count {pid} \d+|exit {pid} 0)$", start=mark, root=False)
    fork = int(w.wait_for(r"^fork (\d+)$", start=mark, root=False).group(1))
    w.wait_for(rf"^exit {fork} 0$", start=mark, timeout=5, root=False)


# A small Python workload for what the C workloads do not do: a subreaper root whose
# grandchild is re-parented to it, and pages dropped with MADV_DONTNEED between passes.
PYWORKER = r"""
import ctypes, mmap, os, signal, sys, time, zlib
out = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
def say(*words):
    os.write(out, (" ".join(map(str, words)) + "\n").encode())
want = set()
signal.signal(signal.SIGUSR1, lambda *a: want.add("usr1"))
signal.signal(signal.SIGUSR2, lambda *a: want.add("usr2"))
if sys.argv[2] == "dontneed":
    m = mmap.mmap(-1, 64 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in range(64):
        m[i * 4096:(i + 1) * 4096] = bytes([i + 1]) * 4096
    say("ready", os.getpid())
    while True:
        if "usr2" in want:
            want.discard("usr2")
            m.madvise(mmap.MADV_DONTNEED, 0, 32 * 4096)
            say("dropped")
        if "usr1" in want:
            want.discard("usr1")
            say("sum", zlib.crc32(m), m[0], m[40 * 4096])
        time.sleep(0.01)
elif sys.argv[2] == "grow":
    # Maps memory right below its lowest mapping (the executable), at a fixed address:
    # there, in the widest hole of a usual layout, a replica keeps pycr's workspace.
    libc = ctypes.CDLL(None)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    size = 8 << 20
    say("ready", os.getpid())
    while True:
        if "usr2" in want:
            want.discard("usr2")
            with open("/proc/self/maps") as f:
                lowest = int(f.readline().split("-")[0], 16)
            addr = libc.mmap(lowest - size, size, 3, 0x22 | 0x100000, -1, 0)   # FIXED_NOREPLACE
            region = (ctypes.c_char * size).from_address(addr)
            region[:] = bytes(range(256)) * (size // 256)
            say("grown", hex(addr))
        if "usr1" in want:
            want.discard("usr1")
            say("sum", zlib.crc32(bytes(region)))
        time.sleep(0.01)
else:
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)          # PR_SET_CHILD_SUBREAPER
    say("ready", os.getpid())
    middle = os.fork()
    if middle == 0:
        grand = os.fork()
        if grand == 0:
            n = 0
            while True:
                n += 1
                say("count", os.getpid(), n)
                time.sleep(0.02)
        say("grand", grand)
        while True:
            time.sleep(1)
    while True:
        if "usr2" in want:
            want.discard("usr2")
            os.kill(middle, signal.SIGKILL)
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            pid = 0
        if pid:
            say("exit", pid, status)
        time.sleep(0.01)
"""


@pytest.fixture
def pyworker(tmp_path):
    path = tmp_path / "pyworker"
    path.write_text(f"#!{sys.executable}\n" + PYWORKER)
    path.chmod(0o755)
    return str(path)


def test_reparented_task_is_recreated_under_its_new_parent(spawn, pyworker, cleanup_pids):
    """A middle process dies between passes; its child moves to the subreaper root on the
    source, and is re-created under the root in the replica, its memory whole."""
    w = spawn(pyworker, "reparent")
    grand = int(w.wait_for(r"^grand (\d+)$").group(1))
    middle = procutil.ppid(grand)
    w.wait_for(rf"^count {grand} 5$")

    def between(rep, replica):
        if rep.number == 1:
            w.signal(signal.SIGUSR2)
            w.wait_for(rf"^exit {middle} 9$", start=0)
            assert procutil.ppid(grand) == w.pid

    res = migrate(w.pid, policy=Policy(max_passes=4, min_delta=0),
                  on_pass=registering(cleanup_pids, then=between))
    assert sum(r.recreated for r in res.reports) == 1, [r.line() for r in res.reports]
    got = ns_tasks(res.summary.init_real)
    assert sorted(got) == sorted([w.pid, grand])
    assert got[grand][1] == w.pid
    n = int(w.last(f"count {grand}").split()[2])
    w.wait_for(rf"^count {grand} {n + 5}$", start=w.mark() - 1, root=False)
    counts = [int(f[0]) for f in w.fields(f"count {grand}")]
    assert counts == list(range(1, len(counts) + 1)), "the re-created task must go on, not start over"
    procutil.assert_running_untraced(got[grand][0])


def test_new_mapping_over_the_workspace_moves_it(spawn, pyworker, cleanup_pids):
    """The source maps memory where the replica keeps pycr's workspace: the workspace
    moves out of the way and the new mapping gets its bytes."""
    w = spawn(pyworker, "grow")
    workspaces = []

    def between(rep, replica):
        workspaces.append(replica.tasks[w.pid].workspace)
        if rep.number == 1:
            w.signal_and_wait(signal.SIGUSR2, r"^grown 0x[0-9a-f]+$")

    res = migrate(w.pid, policy=Policy(max_passes=3, min_delta=0),
                  on_pass=registering(cleanup_pids, then=between))
    addr = int(w.last("grown").split()[1], 16)
    assert addr <= workspaces[0] < addr + (8 << 20), "the test mapping must cover the first workspace"
    assert not addr <= workspaces[1] < addr + (8 << 20)
    want = zlib.crc32(bytes(range(256)) * (8 << 12))
    got = signal_and_wait(w, res.summary.root_real, signal.SIGUSR1, r"^sum (\d+)$").group(1)
    assert got == str(want)


@pytest.mark.parametrize("tracker", ["uffd-wp", "hash"])
def test_pages_dropped_between_passes_read_as_zeros(spawn, pyworker, cleanup_pids, tracker):
    """MADV_DONTNEED between passes: the source no longer has those pages (nothing reads
    them, so they stay unpopulated; uffd-wp saves its markers as zero pages, the hash
    tracker leaves them out of the pagemap); the replica must not keep its copies."""
    require_tracker(tracker)
    w = spawn(pyworker, "dontneed")

    def between(rep, replica):
        if rep.number == 1:
            w.signal_and_wait(signal.SIGUSR2, r"^dropped$")

    res = migrate(w.pid, policy=Policy(max_passes=4, min_delta=0), tracker=tracker,
                  on_pass=registering(cleanup_pids, then=between))
    want = bytes(32 * 4096) + b"".join(bytes([i + 1]) * 4096 for i in range(32, 64))
    got = signal_and_wait(w, res.summary.root_real, signal.SIGUSR1, r"^sum (\d+ \d+ \d+)$").group(1)
    assert got == f"{zlib.crc32(want)} 0 41"


# ---------------------------------------------------------------- memory

def test_mapper_memory_and_layout_survive_reshaping(spawn, tmp_path, cleanup_pids):
    """mmap/munmap/mremap/mprotect between passes: the replica ends with the same layout and bytes."""
    w = spawn("mapper", 2)
    seen = {}

    def between(rep, replica):
        if rep.number == 1:
            seen["step1"] = int(w.last("step").split()[1])
            w.wait_for(rf"^step {seen['step1'] + 51}$")     # many reshaping steps between pass 1 and pass 2
        elif rep.number == 2:
            seen["step2"] = int(w.signal_and_wait(signal.SIGUSR2, r"^paused (\d+)$").group(1))
            seen["regions"] = w.signal_and_wait(signal.SIGUSR1, r"^regions (.*)$").group(1)
            seen["sum"] = w.wait_for(r"^sum ([0-9a-f]+)$", start=w.mark() - 1).group(1)
            seen["maps"] = procutil.coalesced_maps(w.pid)

    res = migrate(w.pid, policy=Policy(max_passes=4, min_delta=0),
                  on_pass=registering(cleanup_pids, then=between))
    assert seen["step2"] > seen["step1"] + 50
    replica = res.summary.root_real
    assert procutil.coalesced_maps(replica) == seen["maps"]
    mark = w.mark()
    assert signal_and_wait(w, replica, signal.SIGUSR1, r"^regions (.*)$").group(1) == seen["regions"]
    assert w.wait_for(r"^sum ([0-9a-f]+)$", start=mark, root=False).group(1) == seen["sum"]
    # It is still paused where the source was, and goes on reshaping itself.
    signal_and_wait(w, replica, signal.SIGUSR2, rf"^resumed {seen['step2']}$")
    # Many more steps: each mremap/munmap/mprotect needs the replica's VMAs to be the source's.
    w.wait_for(rf"^step {seen['step2'] + 300}$", start=mark, root=False)
    with open(w.log_path) as log:
        assert "error" not in log.read()
    procutil.assert_running_untraced(replica)


def test_execer_execs_between_passes(spawn, tmp_path, cleanup_pids, workloads):
    """An exec between passes replaces the replica's address space; it goes on as the new program."""
    w = spawn("execer", 0)
    w.wait_for(r"^count 5$")

    def between(rep, replica):
        if rep.number == 1:
            mark = w.mark()
            w.signal(signal.SIGUSR2)
            w.wait_for(rf"^ready {w.pid}$", start=mark)
            w.wait_for(r"^count 5$", start=mark)

    res = migrate(w.pid, policy=Policy(max_passes=4, min_delta=0),
                  on_pass=registering(cleanup_pids, then=between))
    replica = res.summary.root_real
    assert os.readlink(f"/proc/{replica}/exe") == workloads["counter"]
    assert not any(path == workloads["execer"] for _, _, _, path in procutil.maps(replica))
    after_exec = w.lines()[max(i for i, line in enumerate(w.lines()) if line.startswith("ready")) + 1:]
    counts = [int(line.split()[1]) for line in after_exec if line.startswith("count ")]
    # The counter (the exec'd program) counts on from where the source was, without a gap.
    n = counts[-1]
    w.wait_for(rf"^count {n + 5}$", start=w.mark() - 1, root=False)
    after_exec = w.lines()[max(i for i, line in enumerate(w.lines()) if line.startswith("ready")) + 1:]
    counts = [int(line.split()[1]) for line in after_exec if line.startswith("count ")]
    assert counts == list(range(1, len(counts) + 1))
    procutil.assert_running_untraced(replica)


def test_counter_replica_never_runs_before_the_final_pass(spawn, tmp_path, cleanup_pids, workloads):
    """Between passes every replica task sits in a ptrace stop and its memory does not move;
    after the final pass the counter goes on from the source's last value."""
    w = spawn("counter")
    w.wait_for(r"^count 3$")
    checked = []

    def between(rep, replica):
        if rep.kind != "pre-dump":
            return
        real = replica.tasks[w.pid].real
        for r in replica.reals:
            assert procutil.state(r) == "t", f"replica task {r} is {procutil.state(r)}"
        addr = symbol_address(real, workloads["counter"], "counter")
        first = procutil.read_memory(real, addr, 8)
        source_mark = w.mark()
        w.wait_for(r"^count \d+$", start=source_mark + 5)     # the source counts on meanwhile
        assert procutil.read_memory(real, addr, 8) == first
        assert read_memory(ImageDir(rep.path), str(w.pid), addr, 8) == first
        assert w.mark() > source_mark + 5, "the source must keep counting meanwhile"
        checked.append(int.from_bytes(first, "little"))

    res = migrate(w.pid, policy=Policy(max_passes=4, min_delta=0),
                  on_pass=registering(cleanup_pids, then=between))
    assert len(checked) >= 2 and checked[-1] > checked[0]
    replica = res.summary.root_real
    n = int(w.last("count").split()[1])
    w.wait_for(rf"^count {n + 5}$", start=w.mark() - 1, root=False)
    counts = [int(f[0]) for f in w.fields("count")]
    assert counts == list(range(1, len(counts) + 1)), "a count was lost or repeated across the migration"
    procutil.assert_running_untraced(replica)
    assert procutil.status(replica)["NSpid"].split() == [str(replica), str(w.pid)]
    assert res.summary.downtime > 0


def test_threads_are_created_at_the_final_pass(spawn, cleanup_pids):
    """Between passes the replica is its leader alone; at the end every thread is back with its TID."""
    w = spawn("threads")
    tids = w.threads()
    assert len(tids) == 4
    counted = []

    def between(rep, replica):
        counted.append(len(procutil.threads(replica.tasks[w.pid].real)))

    res = migrate(w.pid, policy=Policy(max_passes=3, min_delta=0),
                  on_pass=registering(cleanup_pids, then=between))
    assert counted[:-1] == [1] * (len(counted) - 1)
    replica = res.summary.root_real
    inner = sorted(int(procutil.status(f"{replica}/task/{t}")["NSpid"].split()[-1])
                   for t in procutil.threads(replica))
    assert inner == tids
    mark = w.mark()
    for tid in tids:
        first = int(w.wait_for(rf"^count {tid} (\d+)$", start=mark, root=False).group(1))
        w.wait_for(rf"^count {tid} {first + 2}$", start=mark, root=False)
        assert first > 5, "a thread started over"
    procutil.assert_running_untraced(replica)


def test_shared_anonymous_memory_stays_shared(spawn_python, tmp_path, cleanup_pids):
    """A MAP_SHARED|MAP_ANONYMOUS region written between passes: one object in the replica too."""
    from test_restore import SHARED_ANON_SCRIPT
    w = spawn_python("shared_anon", SHARED_ANON_SCRIPT)
    child = int(w.wait_for(r"^child (\d+)$").group(1))
    w.wait_for(r"^seen [1-9]\d* hello$")

    def between(rep, replica):
        if rep.kind != "pre-dump":
            return
        # The child writes the shared page again before the next pass.
        mark, last = w.mark(), int(w.last("seen").split()[1])
        assert procutil.wait_until(lambda: any(int(f[0]) > last + 5 for f in w.fields("seen", mark))), \
            "the child stopped writing the shared page"

    res = migrate(w.pid, policy=Policy(max_passes=4, min_delta=0),
                  on_pass=registering(cleanup_pids, then=between))
    last = int(w.last("seen").split()[1])
    got = ns_tasks(res.summary.init_real)
    mark = w.mark()
    # The parent sees the child's writes go on from where they were: the same object.
    procutil.wait_until(lambda: [f for f in w.fields("seen", mark) if int(f[0]) >= last + 20])
    seen = [int(f[0]) for f in w.fields("seen", mark)]
    assert seen and seen[0] >= last and seen[-1] >= last + 20, seen[-5:]
    assert all(f[1] == "hello" for f in w.fields("seen", mark))
    shared = lambda pid: {(s, e): path for s, e, p, path in procutil.maps(pid) if p[3] == "s"}
    assert shared(got[w.pid][0]) and shared(got[w.pid][0]) == shared(got[child][0])


# ---------------------------------------------------------------- failures

def test_replica_killed_in_a_middle_pass(spawn, tmp_path, cleanup_pids):
    """The destination side dies between passes: the migration fails, the source runs on."""
    w = spawn("counter")
    w.wait_for(r"^count 3$")
    reals = []

    def kill_replica(number, path):
        if number == 2:
            procutil.kill(reals[1], signal.SIGKILL)     # the replica's root (reals[0] is its init)

    with pytest.raises(PycrError):
        migrate(w.pid, policy=Policy(max_passes=5, min_delta=0), on_image_set=kill_replica,
                on_pass=registering(cleanup_pids, seen=reals))
    assert len(reals) == 2
    assert_source_unharmed(w, reals)


@pytest.mark.parametrize("where", ["02-pre-dump", "03-dump"])
def test_corrupt_delta(spawn, tmp_path, cleanup_pids, where):
    """A truncated pages file in a middle pass or in the final dump: the source runs on."""
    w = spawn("counter")
    w.wait_for(r"^count 3$")
    reals = []

    def corrupt(number, path):
        if os.path.basename(path) == where:
            pages = os.path.join(path, f"pages-{w.pid}.img")
            os.truncate(pages, os.path.getsize(pages) - 4096)

    with pytest.raises(PycrError, match=f"pages-{w.pid}.img"):
        migrate(w.pid, work_dir=tmp_path / "work", policy=Policy(max_passes=3, min_delta=0),
                on_image_set=corrupt, on_pass=registering(cleanup_pids, seen=reals))
    assert os.path.isdir(tmp_path / "work" / where)
    assert_source_unharmed(w, reals)


# ---------------------------------------------------------------- the commands

def _on_disk(pass_dir):
    """(pages, bytes) of an image set as the files on disk say: pages in its pages-*.img
    files, bytes of every file in it."""
    pages = total = 0
    for name in os.listdir(pass_dir):
        size = os.path.getsize(os.path.join(pass_dir, name))
        total += size
        if name.startswith("pages-"):
            assert size % PAGE == 0, name
            pages += size // PAGE
    return pages, total


PAGE = os.sysconf("SC_PAGE_SIZE")
STEP_MS = 5


def test_cli_migrate_reports_every_pass(spawn, tmp_path, cleanup_pids, workloads):
    """Each pass's pages and bytes are those of its directory on disk (--work-dir), the
    total is theirs, and the downtime is no longer than the gap the counter saw."""
    w = spawn("counter", STEP_MS, "clock")
    w.wait_for(r"^count 3 \d+$")
    counter_at = symbol_address(w.pid, workloads["counter"], "counter")
    work = tmp_path / "work"
    proc = pycr("migrate", "-t", w.pid, "--max-passes", 4, "--min-delta", "0", "--work-dir", work)
    lines = proc.stdout.strip().splitlines()
    m = re.search(r"\(pid (\d+) outside its namespace, namespace init (\d+)\)", proc.stdout)
    assert m, proc.stdout
    root, init = int(m.group(1)), int(m.group(2))
    cleanup_pids.add(init, root)
    passes = [PASS_LINE.match(line) for line in lines if line.startswith("pass ")]
    assert all(passes) and [int(p.group(1)) for p in passes] == list(range(1, len(passes) + 1))
    assert [p.group(2) for p in passes][-1] == "dump"
    assert all(p.group(2) == "pre-dump" for p in passes[:-1])
    assert passes[0].group(3) == "1" and int(passes[0].group(5)) > 0
    dirs = sorted(os.listdir(work))
    assert dirs == [f"{int(p.group(1)):02d}-{p.group(2)}" for p in passes]
    for p, d in zip(passes, dirs):
        assert (int(p.group(5)), int(p.group(6))) == _on_disk(work / d), f"pass {p.group(1)}"
    down = re.search(r"^downtime ([0-9.]+) s .*, (\d+) bytes moved in (\d+) pass(?:es)?$", lines[-1])
    assert down and int(down.group(2)) == sum(_on_disk(work / d)[1] for d in dirs)
    assert int(down.group(3)) == len(passes)
    # The source wrote counts up to the one in the final dump, the replica goes on from
    # there: the largest gap between the counter's own timestamps around the switch is at
    # least the downtime (nothing counted meanwhile) and at most a step more (plus slack).
    final = int.from_bytes(read_memory(ImageDir(work / dirs[-1]), str(w.pid), counter_at, 8), "little")
    w.wait_for(rf"^count {final + 5} \d+$", start=0, root=False)
    stamps = {int(f[0]): int(f[1]) for f in w.fields("count")}
    assert sorted(stamps) == list(range(1, max(stamps) + 1)), "a count was lost across the migration"
    gap = max(stamps[n + 1] - stamps[n] for n in range(max(1, final - 2), final + 2))
    downtime_ms = float(down.group(1)) * 1000
    assert downtime_ms <= gap + 1, (downtime_ms, gap)
    assert gap <= downtime_ms + STEP_MS + 500, (downtime_ms, gap)
    procutil.assert_running_untraced(root)
    # The replica lives in a PID namespace below pycr's: dumping it from here would
    # record the outer PIDs, and getpid would change at restore. Refused by name.
    line = one_line_error(pycr("dump", "-t", root, "-D", tmp_path / "nested", "-R", expect=1))
    assert line == (f"pycr: pid {root} (counter) is pid {w.pid} in a PID namespace below pycr's: dumping a "
                    "nested PID namespace is not supported (run pycr inside it)")
    procutil.assert_running_untraced(root)


def _passes(stdout):
    """[(number, kind, pages)] of the pass lines of `pycr migrate`."""
    return [(int(m.group(1)), m.group(2), int(m.group(5))) for m in map(PASS_LINE.match, stdout.splitlines()) if m]


@pytest.mark.time_limit(240)
def test_cli_migrate_stop_rules(spawn, tmp_path, cleanup_pids):
    """--max-passes, --min-delta and --threshold decide the number of passes the command
    reports, against a workload that writes megabytes between passes."""
    def run(*options):
        w = spawn("bigmem", 64, "--dirty-pct-per-sec", 100)
        w.wait_for(r"^dirtied \d+$")
        proc = pycr("migrate", "-t", w.pid, *options)
        m = re.search(r"\(pid (\d+) outside its namespace, namespace init (\d+)\)", proc.stdout)
        cleanup_pids.add(int(m.group(2)), int(m.group(1)))
        passes = _passes(proc.stdout)
        assert re.search(rf"bytes moved in {len(passes)} pass(es)?$", proc.stdout.strip()), proc.stdout
        assert [kind for _, kind, _ in passes] == ["pre-dump"] * (len(passes) - 1) + ["dump"]
        w.kill()
        return passes

    # At most N passes, the final dump included.
    assert len(run("--max-passes", 2)) == 2
    # The second pass copied less than 1 GiB: final dump next (the full copy and one more come first).
    assert len(run("--min-delta", "1G")) == 3
    # ... or at most 100 % of the first pass.
    assert len(run("--threshold", 100)) == 3
    # Megabytes written between passes: 4 KiB is never reached, nor 0.001 % of the first pass;
    # the second pass copied less than the first (still shrinking): a third, then --max-passes.
    for rule in (("--min-delta", "4K"), ("--threshold", "0.001")):
        passes = run(*rule, "--max-passes", 4)
        assert passes[1][2] > 1 and passes[1][2] < passes[0][2], passes
        assert len(passes) == 4, passes


def test_cli_migrate_refuses_a_missing_process(tmp_path):
    proc = pycr("migrate", "-t", procutil.free_pids()[0], expect=1)
    assert "no such process" in one_line_error(proc)


def test_restore_follow_applies_passes_as_they_come(spawn, tmp_path, cleanup_pids, workloads):
    """pycr pre-dump twice, then pycr dump, into pass directories that a follower applies."""
    w = spawn("counter")
    w.wait_for(r"^count 3$")
    top = tmp_path / "passes"
    top.mkdir()
    with Follower(top) as follower:
        pycr("pre-dump", "-t", w.pid, "-D", top / "a")
        replica = follower.stopped_replica(cleanup_pids)
        assert procutil.status(replica)["NSpid"].split()[-1] == str(w.pid)
        pycr("pre-dump", "-t", w.pid, "-D", top / "b", "--prev-images-dir", "../a")
        # The follower applies the second pass: the replica's counter becomes the one in it.
        addr = symbol_address(replica, workloads["counter"], "counter")
        in_b = read_memory(ImageDir(top / "b"), str(w.pid), addr, 8)
        assert procutil.wait_until(lambda: procutil.read_memory(replica, addr, 8) == in_b, timeout=20), \
            "the follower did not apply the second pass"
        assert procutil.state(replica) == "t", "the replica must stay stopped until the dump"
        pycr("dump", "-t", w.pid, "-D", top / "c", "--prev-images-dir", "../b")
        follower.finish()
        n = int(w.last("count").split()[1])
        w.wait_for(rf"^count {n + 5}$", start=w.mark() - 1, root=False)
        counts = [int(f[0]) for f in w.fields("count")]
        assert counts == list(range(1, len(counts) + 1))
        procutil.assert_running_untraced(replica)


# ---------------------------------------------------------------- the diffs on their own

def test_treediff_kills_gone_forks_new_and_recreates_moved():
    old = [Node(10, 1, 100), Node(11, 10, 101), Node(12, 11, 102), Node(13, 10, 103)]
    # 11 died: 12 went to the root (a subreaper); 13 exited and its PID was reused by a new 13; 14 is new.
    new = [Node(10, 1, 100), Node(12, 10, 102), Node(13, 10, 200), Node(14, 12, 201)]
    d = diff(old, new)
    assert d.removed == [13, 12, 11]          # children before parents
    assert d.added == [12, 13, 14]            # parents before children
    assert d.recreated == {12}
    assert d.kept == [10]


def test_mmdiff_keeps_same_backing_and_plans_the_rest():
    from construct import Container
    from pycr.proc.maps import parse_line

    live = [parse_line(line) for line in (
        "10000-14000 rw-p 00000000 00:00 0",
        "20000-30000 rw-p 00000000 00:00 0",
        "40000-41000 r--p 00002000 08:01 77 /bin/x",
    )]

    def vma(start, end, kind="anon", prot=3, path="", pgoff=0, inode=0, shared=False):
        return Container(start=start, end=end, kind=kind, prot=prot, path=path, pgoff=pgoff, inode=inode,
                         shared=shared, shmem_id=0, vmflags="")

    want = [vma(0x10000, 0x12000, prot=1),                 # shrunk and re-protected: kept part
            vma(0x20000, 0x34000),                         # grown: only the tail is new
            vma(0x40000, 0x41000, "file", 1, "/bin/x", 0x3000, 77)]   # other file offset: remapped
    p = plan(live, want, {})
    assert list(p.unmap) == [0x12000, 0x2000]
    assert [(s, e) for _, s, e in p.map] == [(0x30000, 0x34000), (0x40000, 0x41000)]
    assert list(p.fresh) == [0x30000, 0x4000, 0x40000, 0x1000]
    assert p.protect == []
