"""The workloads and fixtures themselves, without pycr: every later test relies
on them behaving as documented and on cleanup leaving nothing behind."""

import ctypes
import os
import signal
import subprocess
import time

import pytest

import procutil
from conftest import TimeLimitExceeded, kill_tree

ENOMSG, EIDRM = 42, 43


def counts(w, prefix="count"):
    return [int(f[-1]) for f in w.fields(prefix)]


def wait_count_above(w, n, key=None, timeout=5.0):
    """Wait until a "count [key] N" line with N > n appears; return N."""
    prefix = "count" if key is None else f"count {key}"
    got = procutil.wait_until(lambda: next((int(f[-1]) for f in w.fields(prefix) if int(f[-1]) > n), None),
                              timeout)
    if got is None:
        raise AssertionError(f"{w}: count {key or ''} stayed at {n}")
    return got


def test_workloads_are_pie_executables(workloads):
    assert set(workloads) >= {"counter", "tree", "threads", "bigmem", "openfile", "pipe",
                              "seccomp", "forker", "mapper", "execer"}
    for name, path in workloads.items():
        with open(path, "rb") as f:
            header = f.read(18)
        assert header[:4] == b"\x7fELF", name
        assert int.from_bytes(header[16:18], "little") == 3, f"{name} is not PIE (ET_DYN)"


def test_counter_counts_and_handles_usr1(spawn):
    w = spawn("counter")
    assert w.ready.group(0) == f"ready {w.pid}"
    first = wait_count_above(w, 2)
    later = wait_count_above(w, first + 5)
    values = counts(w)
    assert values == list(range(1, len(values) + 1)), "counter must count 1, 2, 3, ... in steps of 1"
    assert later > first
    m = w.signal_and_wait(signal.SIGUSR1, r"^usr1 (\d+)$")
    assert int(m.group(1)) >= later


def test_workload_has_clean_fd_table_and_own_session(spawn):
    w = spawn("counter")
    fds = procutil.fds(w.pid)
    assert sorted(fds) == [0, 1, 2, 3], fds
    assert fds[0] == "/dev/null"
    assert fds[1] == fds[2] == w.log_path
    assert fds[3] == w.status_path
    assert procutil.sid(w.pid) == w.pid
    assert procutil.pgid(w.pid) == w.pid
    assert procutil.ppid(w.pid) == os.getpid()


def test_counter_writes_status_at_its_own_offset(spawn):
    """Reports are plain write(2)s at the fd's offset (not O_APPEND): the offset
    a restore must bring back is the file's size."""
    w = spawn("counter")
    wait_count_above(w, 3)
    with open(f"/proc/{w.pid}/fdinfo/3") as f:
        info = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
    flags = int(info["flags"].strip(), 8)
    assert not flags & os.O_APPEND
    assert flags & os.O_ACCMODE == os.O_WRONLY


def test_tree_has_four_processes_with_grandchild_and_own_group(spawn):
    w = spawn("tree")
    procs = {int(f[0]): (int(f[1]), int(f[2])) for f in w.fields("proc")}
    assert len(procs) == 4
    kids = procutil.children(w.pid)
    assert len(kids) == 2
    grandkids = [g for k in kids for g in procutil.children(k)]
    assert len(grandkids) == 1
    assert sorted(w.descendants()) == sorted(kids + grandkids)
    assert set(procs) == {w.pid, *kids, *grandkids}
    for pid, (ppid, pgid) in procs.items():
        assert procutil.ppid(pid) == ppid
        assert procutil.pgid(pid) == pgid
        assert procutil.sid(pid) == w.pid
    groups = {procutil.pgid(p) for p in procs}
    assert len(groups) == 2, "one child leads its own process group"
    for pid in procs:
        wait_count_above(w, 2, key=pid)


def test_threads_has_four_counting_threads(spawn):
    w = spawn("threads")
    tids = procutil.threads(w.pid)
    assert len(tids) == 4
    assert sorted(int(f[0]) for f in w.fields("thread")) == tids
    for tid in tids:
        wait_count_above(w, 3, key=tid)


def bigmem_region(w):
    m = w.wait_for(r"^region ([0-9a-f]+) (\d+)$")
    return int(m.group(1), 16), int(m.group(2))


def test_bigmem_checksum_is_stable_and_matches_memory(spawn):
    w = spawn("bigmem", 16)
    addr, size = bigmem_region(w)
    assert size == 16 << 20
    assert any(start <= addr and addr + size <= end for start, end, _, _ in procutil.maps(w.pid))
    first = w.signal_and_wait(signal.SIGUSR1, r"^sum ([0-9a-f]+)$").group(1)
    second = w.signal_and_wait(signal.SIGUSR1, r"^sum ([0-9a-f]+)$").group(1)
    assert first == second
    assert int(first, 16) == procutil.checksum(procutil.read_memory(w.pid, addr, size))


def test_bigmem_seed_changes_content(spawn):
    a = spawn("bigmem", 4)
    b = spawn("bigmem", 4, "--seed", 12345)
    sum_a = a.signal_and_wait(signal.SIGUSR1, r"^sum (\w+)$").group(1)
    sum_b = b.signal_and_wait(signal.SIGUSR1, r"^sum (\w+)$").group(1)
    assert sum_a != sum_b


def test_bigmem_dirtying_rewrites_pages(spawn):
    w = spawn("bigmem", 8, "--dirty-pct-per-sec", 50)
    addr, size = bigmem_region(w)
    before = procutil.read_memory(w.pid, addr, size)
    m = w.wait_for(r"^dirtied (\d+)$", timeout=5)
    # 50 %/s of 2048 pages is about 1024 pages a second.
    assert 500 <= int(m.group(1)) <= 1500
    after = procutil.read_memory(w.pid, addr, size)
    changed = sum(before[i:i + 4096] != after[i:i + 4096] for i in range(0, size, 4096))
    assert changed > 0


def test_openfile_reports_offset_and_reads_known_bytes(spawn, tmp_path):
    path = tmp_path / "data.bin"
    w = spawn("openfile", path)
    fd = int(w.wait_for(r"^fd (\d+)$").group(1))
    assert os.readlink(f"/proc/{w.pid}/fd/{fd}") == str(path)
    assert w.signal_and_wait(signal.SIGUSR1, r"^offset (\d+)$").group(1) == "12345"
    got = bytes.fromhex(w.signal_and_wait(signal.SIGUSR2, r"^read (\w*)$").group(1))
    assert got == bytes((i * 31 + 7) & 0xFF for i in range(12345, 12345 + 16))
    assert w.signal_and_wait(signal.SIGUSR1, r"^offset (\d+)$").group(1) == str(12345 + 16)
    assert path.stat().st_size == 65536


def test_pipe_child_gets_the_buffered_message(spawn):
    w = spawn("pipe")
    child = int(w.wait_for(r"^child (\d+)$").group(1))
    assert procutil.ppid(child) == w.pid
    rfd = [fd for fd, target in procutil.fds(child).items() if target.startswith("pipe:")]
    wfd = [fd for fd, target in procutil.fds(w.pid).items() if target.startswith("pipe:")]
    assert len(rfd) == 1 and len(wfd) == 1
    assert procutil.fds(child)[rfd[0]] == procutil.fds(w.pid)[wfd[0]], "same pipe inode"
    # Kept: not reading is not an event; the child checks for SIGUSR1 every 10 ms, so
    # in this time one that reads on its own would have.
    time.sleep(0.1)
    assert "got" not in w.text(), "the child must not read before SIGUSR1"
    m = w.signal_and_wait(signal.SIGUSR1, r"^got ([0-9a-f]*)$", pid=child)
    assert bytes.fromhex(m.group(1)) == b"pycr pipe message 0123456789"


def test_pipe_with_large_message(spawn):
    w = spawn("pipe", 5000)
    child = int(w.wait_for(r"^child (\d+)$").group(1))
    m = w.signal_and_wait(signal.SIGUSR1, r"^gotsum ([0-9a-f]+)$", pid=child)
    expected = bytes((i * 7 + 3) & 0xFF for i in range(5000))
    assert int(m.group(1), 16) == procutil.checksum(expected)


def test_seccomp_filters_give_their_errno(spawn):
    w = spawn("seccomp")
    st = procutil.status(w.pid)
    assert st["Seccomp"] == "2"
    assert st["Seccomp_filters"] == "2"
    assert st["NoNewPrivs"] == "1"
    start = w.mark()
    w.signal(signal.SIGUSR1)
    assert int(w.wait_for(r"^filtered errno (\d+)$", start=start).group(1)) == ENOMSG
    assert int(w.wait_for(r"^filtered2 errno (\d+)$", start=start).group(1)) == EIDRM
    wait_count_above(w, counts(w)[-1])


def test_forker_forks_and_reaps_workers(spawn):
    w = spawn("forker")
    m = w.wait_for(r"^exit (\d+) (\d+)$", timeout=5)
    pid, code = int(m.group(1)), int(m.group(2))
    assert code == 0
    forked = [int(f[0]) for f in w.fields("fork")]
    assert pid in forked
    assert any(int(f[0]) == pid for f in w.fields("count"))
    # Workers live 500 ms and are forked every 200 ms: a few at a time.
    assert 1 <= len(procutil.children(w.pid)) <= 4
    w.wait_for(r"^fork \d+$", start=w.mark())
    assert len(w.fields("fork")) > len(forked)


def test_mapper_sum_matches_its_regions(spawn):
    w = spawn("mapper")
    w.wait_for(r"^step 20$", timeout=5)
    w.signal_and_wait(signal.SIGUSR2, r"^paused \d+$")
    start = w.mark()
    w.signal(signal.SIGUSR1)
    regions = w.wait_for(r"^regions (.*)$", start=start).group(1)
    reported = int(w.wait_for(r"^sum ([0-9a-f]+)$", start=start).group(1), 16)
    spans = [(int(a, 16), int(n)) for a, n in (r.split(":") for r in regions.split(",") if r)]
    assert spans and spans == sorted(spans)
    data = [procutil.read_memory(w.pid, a, n) for a, n in spans]
    assert reported == procutil.checksum(*data)
    step = int(w.signal_and_wait(signal.SIGUSR2, r"^resumed (\d+)$").group(1))
    w.wait_for(rf"^step {step + 3}$", timeout=5)


def test_execer_execs_counter_keeping_pid_and_status(spawn, workloads):
    w = spawn("execer", 300)
    assert os.readlink(f"/proc/{w.pid}/exe") == workloads["execer"]
    exec_at = w.wait_for(rf"^exec {w.pid}$", timeout=5)
    assert exec_at
    w.wait_for(rf"^ready {w.pid}$", start=w.lines().index(f"exec {w.pid}"))
    assert os.readlink(f"/proc/{w.pid}/exe") == workloads["counter"]
    lines = w.lines()
    assert lines.count(f"ready {w.pid}") == 2
    wait_count_above(w, 3)
    assert sorted(procutil.fds(w.pid)) == [0, 1, 2, 3]


def test_execer_execs_on_usr2(spawn):
    w = spawn("execer", 0)
    w.wait_for(r"^count 20$")       # 20 steps of its own: with delay 0 it never execs by itself
    assert "exec" not in w.text()
    w.signal_and_wait(signal.SIGUSR2, rf"^exec {w.pid}$")


# ---------------------------------------------------------------- cleanup

libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
PTRACE_SEIZE, PTRACE_INTERRUPT = 0x4206, 0x4207


def test_kill_handles_stopped_tree(spawn):
    w = spawn("tree")
    pids = w.pids()
    for pid in pids:
        w.signal(signal.SIGSTOP, pid)
    for pid in pids:
        assert procutil.wait_until(lambda: procutil.state(pid) == "T", 5), procutil.state(pid)
    w.kill()
    assert not any(procutil.exists(p) for p in pids)


def test_kill_handles_tasks_we_trace(spawn):
    w = spawn("threads")
    tids = procutil.threads(w.pid)
    for tid in tids:
        assert libc.ptrace(PTRACE_SEIZE, tid, None, None) == 0, os.strerror(ctypes.get_errno())
        assert libc.ptrace(PTRACE_INTERRUPT, tid, None, None) == 0
        os.waitpid(tid, procutil.WALL)
    assert procutil.tracer_pid(w.pid) == os.getpid()
    assert all(procutil.state(w.pid, t) == "t" for t in tids)
    w.kill()
    assert not procutil.exists(w.pid)


def test_kill_finds_orphans_by_session(spawn):
    w = spawn("tree")
    pids = w.pids()
    os.kill(w.pid, signal.SIGKILL)
    procutil.wait_gone([w.pid], 5)
    orphans = [p for p in pids[1:] if procutil.exists(p)]
    assert orphans and not procutil.descendants(w.pid)
    w.kill()
    assert not any(procutil.exists(p) for p in pids)


def test_cleanup_pids_kills_a_non_child(cleanup_pids):
    out = subprocess.run(["sh", "-c", "sleep 60 </dev/null >/dev/null 2>&1 & echo $!"],
                         capture_output=True, text=True, check=True, close_fds=True)
    orphan = int(out.stdout)
    cleanup_pids.add(orphan)
    assert procutil.ppid(orphan) != os.getpid()
    assert kill_tree(cleanup_pids.targets()) == []
    assert not procutil.exists(orphan)


def test_cleanup_pids_skips_a_reused_pid(cleanup_pids):
    cleanup_pids.add(os.getppid())
    cleanup_pids.entries[os.getppid()] = -1  # as if the PID now named another process
    assert cleanup_pids.targets() == []


def test_free_pids_are_free():
    pids = procutil.free_pids(5, contiguous=True)
    assert len(pids) == 5 and pids == list(range(pids[0], pids[0] + 5))
    assert not any(procutil.exists(p) for p in pids)
    assert pids[-1] < procutil.pid_max()


@pytest.mark.time_limit(0.5)
def test_time_limit_interrupts_a_hang():
    with pytest.raises(TimeLimitExceeded):
        time.sleep(5)
