"""`pycr migrate --to --mode post-copy|hybrid` between two hosts (network namespaces, tests/netns.py).

The tree: a parent and a forked child, each with a thread that writes a known
pattern into tens of MiB (the main thread only reports a CRC-32 of the memory,
which the test recomputes). Post-copy moves it with one short freeze and no
anonymous pages; hybrid copies it in pre-copy passes and sends the pages
written since the last one on fault: the stale copies the replica holds must be
dropped first, or the checksums differ. A source killed once the replica ran
gets the replica killed by the watchdog (it never runs on pages it lacks); a
link cut before the switch leaves the source running untouched and nothing on
the destination.
"""

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

import procutil
from netns import two_hosts  # noqa: F401 (fixture)
from pycr.formats.wire import FrameType, Role
from pycr.net import auth, channel as ch
from test_migrate_net import PASS_LINE, TREE_START, UFFD_LINK, Serve, assert_destination_empty, expected_crc, secret

WORKLOAD = TREE_START + r'''
state = {"step": 0}
lock = threading.Lock()

def writer():
    while True:
        with lock:
            for _ in range(int(pages * per_s * 0.05)):
                touch(buf, state["step"])
                state["step"] += 1
        time.sleep(0.05)

threading.Thread(target=writer, daemon=True).start()
while True:
    with lock:
        line = f"w {idx} {os.getpid()} {state['step']} {zlib.crc32(buf):08x}\n"
    os.write(fd, line.encode())
    time.sleep(0.2)
'''

LAZY_LINE = re.compile(r"^post-copy: (\d+) pages served on (\d+) faults, (\d+) pushed, (\d+) zero; fault median "
                       r"([0-9.]+) us, p99 ([0-9.]+) us; last page after ([0-9.]+) s; (\d+) bytes", re.M)
DOWNTIME = re.compile(r"^downtime ([0-9.]+) s .*\((post-copy|hybrid|pre-copy)\)", re.M)
FAST = {"PYCR_NET_TIMEOUT": "3", "PYCR_NET_IDLE_TIMEOUT": "4", "PYCR_LAZY_RECONNECT": "2"}


class Tree:
    def __init__(self, hosts, tmp_path, nproc, mib, per_s):
        self.out = tmp_path / "out.txt"
        self.out.touch()
        script = tmp_path / "workload.py"
        script.write_text(WORKLOAD)
        self.nproc, self.mib = nproc, mib
        # under a shell that reaps it (and then exits with 128 + the signal that killed it)
        self.proc = hosts.source(["sh", "-c", '"$@"; exit $?', "sh", sys.executable, str(script), str(self.out),
                                  str(nproc), str(mib), str(per_s)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert procutil.wait_until(lambda: len(self.latest()) == nproc, timeout=30), self.out.read_text()
        self.root = procutil.children(self.proc.pid)[0]
        self.pids = [self.root, *procutil.descendants(self.root)]

    def mark(self):
        return len(self.out.read_text().splitlines())

    def latest(self, start=0):
        lines = [f.split() for f in self.out.read_text().splitlines()[start:] if f.startswith("w ")]
        return {int(f[1]): (int(f[2]), int(f[3]), f[4]) for f in lines}

    def assert_counts_on(self, start=0, timeout=15):
        assert procutil.wait_until(lambda: len(self.latest(start)) == self.nproc, timeout=timeout), \
            f"not every process went on: {self.latest(start)}"
        got = self.latest(start)
        for idx, (pid, steps, crc) in got.items():
            assert crc == expected_crc(idx, self.mib, steps), f"process {idx} (pid {pid}): memory differs"
        return got


def _untraced(pid):
    status = procutil._read(f"/proc/{pid}/status") or b""
    return b"\nTracerPid:\t0\n" in status


def _replica_tasks(serve):
    """The replica's processes: those under its namespace's init stub (serve's lazy-pages daemon and its
    watchdog are not)."""
    stubs = [p for p in serve.replica() if (procutil._read(f"/proc/{p}/comm") or b"").strip() == b"pycr-stub"]
    return [p for stub in stubs for p in procutil.descendants(stub) if procutil.state(p) not in (None, "Z", "X")]


def wait_released(serve, m, nproc=2):
    """Wait until the replica's nproc processes run on their own (the source committed, pages still move)."""
    assert procutil.wait_until(lambda: len(_replica_tasks(serve)) == nproc and all(map(_untraced, _replica_tasks(serve))),
                               timeout=30), m.stderr.read() if m.poll() is not None else ""


def migrate(hosts, tree, serve, key, *extra, env=None):
    return hosts.source(hosts.pycr("migrate", "-t", tree.root, "--to", serve.address, "--secret-file", key,
                                   *extra), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_post_copy_moves_the_tree_and_kills_the_source_after_the_last_page(two_hosts, tmp_path):
    key = secret(tmp_path)
    serve = Serve(two_hosts, tmp_path, key)
    tree = Tree(two_hosts, tmp_path, nproc=2, mib=24, per_s=0.02)
    before = tree.latest()
    m = migrate(two_hosts, tree, serve, key, "--mode", "post-copy")
    out, err = m.communicate(timeout=60)
    assert m.returncode == 0, out + err
    passes = PASS_LINE.findall(out)
    assert len(passes) == 1 and passes[0][1] == "dump", out
    assert int(passes[0][5]) < 4 << 20, "the one set carries no anonymous memory"
    lazy = LAZY_LINE.search(out)
    assert lazy, out
    served, pushed = int(lazy.group(1)), int(lazy.group(3))
    assert (served + pushed) * 4096 >= 2 * 24 << 20 and int(lazy.group(8)) >= 2 * 24 << 20, out
    assert DOWNTIME.search(out).group(2) == "post-copy"
    print(out)
    assert tree.proc.wait(timeout=10) == 128 + signal.SIGKILL
    procutil.wait_gone(tree.pids[1:])
    status, _, serve_err = serve.result()
    assert status == 0, serve_err
    after = tree.assert_counts_on(tree.mark())
    for idx, (pid, steps, _) in after.items():
        assert pid == before[idx][0] and steps >= before[idx][1]


def test_hybrid_serves_the_pages_written_since_the_last_pass(two_hosts, tmp_path):
    key = secret(tmp_path)
    serve = Serve(two_hosts, tmp_path, key)
    # 10 % of the pages a second: each pass finds pages written since the previous one
    tree = Tree(two_hosts, tmp_path, nproc=2, mib=24, per_s=0.10)
    m = migrate(two_hosts, tree, serve, key, "--mode", "hybrid", "--max-passes", "3")
    out, err = m.communicate(timeout=60)
    assert m.returncode == 0, out + err
    passes = PASS_LINE.findall(out)
    assert len(passes) == 3 and passes[-1][1] == "dump", out
    lazy = LAZY_LINE.search(out)
    assert lazy, out
    moved = int(lazy.group(1)) + int(lazy.group(3))
    # the pages written since pass 2 moved lazily, and only those: never the whole memory again
    assert 0 < moved * 4096 < 2 * 24 << 20, out
    assert int(passes[-1][5]) < 4 << 20, "the final set carries no anonymous memory"
    print(out)
    assert tree.proc.wait(timeout=10) == 128 + signal.SIGKILL
    status, _, serve_err = serve.result()
    assert status == 0, serve_err
    # stale pages left in the replica (not dropped before the uffd was registered) fail these sums
    tree.assert_counts_on(tree.mark())


def test_source_killed_after_the_replica_started_gets_the_replica_killed(two_hosts, tmp_path):
    key = secret(tmp_path)
    serve = Serve(two_hosts, tmp_path, key, env=FAST)
    two_hosts.shape("40mbit")           # 48 MiB take about 10 s: the source dies with most still there
    tree = Tree(two_hosts, tmp_path, nproc=2, mib=24, per_s=0)
    start = tree.mark()
    m = migrate(two_hosts, tree, serve, key, "--mode", "post-copy", env=FAST)
    # the replica was released (the source committed): its two processes (under its namespace's
    # init stub; serve's lazy-pages daemon and its watchdog are not) are traced no more
    wait_released(serve, m)
    procutil.kill(m.pid, signal.SIGKILL)
    m.wait(timeout=10)
    status, _, serve_err = serve.result(timeout=40)
    assert status == 1, serve_err
    assert "killed" in serve_err
    assert_destination_empty(serve)
    # whatever the replica printed before it was killed, it printed from the right memory
    for line in tree.out.read_text().splitlines()[start:]:
        _, idx, _, steps, crc = line.split()
        assert crc == expected_crc(int(idx), tree.mib, int(steps)), line
    # the source tree was left stopped: the one whole copy
    assert procutil.state(tree.root) == "T"
    for pid in tree.pids:
        procutil.kill(pid, signal.SIGKILL)


def _post_copy_held_before_the_switch(two_hosts, tmp_path, key):
    """(serve, tree, migrate) of a post-copy migration whose destination stopped just before its
    replica would run (before the commit point)."""
    serve = Serve(two_hosts, tmp_path, key, env=dict(FAST, PYCR_STOP_AT_STEP="release the restored tree"))
    tree = Tree(two_hosts, tmp_path, nproc=2, mib=8, per_s=0.02)
    m = migrate(two_hosts, tree, serve, key, "--mode", "post-copy", env=FAST)
    seen = []
    while not any("stopped at step" in line for line in seen):
        line = serve.proc.stderr.readline()
        assert line, "".join(seen)
        seen.append(line)
    return serve, tree, m


def test_link_cut_before_the_switch_leaves_the_source_running(two_hosts, tmp_path):
    key = secret(tmp_path)
    serve, tree, m = _post_copy_held_before_the_switch(two_hosts, tmp_path, key)
    two_hosts.cut()
    procutil.kill(serve.pid(), signal.SIGTERM)      # it gives up; the source hears nothing of it
    out, err = m.communicate(timeout=60)
    assert m.returncode == 1, out + err
    assert "thawed" in err, err
    status, _, serve_err = serve.result(timeout=30)
    assert status != 0, serve_err
    # the replica's traced threads are collected too, so its namespace ends at once
    assert "not reaped" not in serve_err, serve_err
    assert_destination_empty(serve)
    for pid in tree.pids:
        procutil.assert_running_untraced(pid)
    tree.assert_counts_on(tree.mark())


def _tcp(ns, *state):
    """(local, peer) address pairs of the TCP sockets in network namespace ns (ss's -H -n output)."""
    out = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "ss", "-Htn", *state], capture_output=True,
                         text=True, check=True).stdout
    return {tuple(line.split()[-2:]) for line in out.splitlines() if line.strip()}


def test_post_copy_pages_come_on_the_migration_connection(two_hosts, tmp_path):
    """The destination never connects to the source (as behind a firewall that lets only source ->
    destination through): all the while, the one TCP connection between the two namespaces is the
    migration's, to serve's port, and the source listens on nothing."""
    key = secret(tmp_path)
    serve = Serve(two_hosts, tmp_path, key)
    two_hosts.shape("200mbit")          # 32 MiB of pages take more than a second: time to look
    tree = Tree(two_hosts, tmp_path, nproc=2, mib=16, per_s=0.02)
    m = migrate(two_hosts, tree, serve, key, "--mode", "post-copy")
    seen, listening = set(), set()
    while m.poll() is None:
        seen |= {c for c in _tcp(two_hosts.dst_ns, "state", "all") if not c[1].endswith(":*")}   # not listeners
        listening |= _tcp(two_hosts.src_ns, "state", "listening")
        time.sleep(0.02)
    out, err = m.communicate()
    assert m.returncode == 0, out + err
    served = LAZY_LINE.search(out)
    assert served and int(served.group(1)) + int(served.group(3)) >= 2 * 4096, out
    mine = f"{two_hosts.dst_addr}:{serve.port}"
    assert seen, "no connection was ever seen"
    assert {local for local, _ in seen} == {mine} and len({peer for _, peer in seen}) == 1, seen
    assert not listening, listening
    assert tree.proc.wait(timeout=10) == 128 + signal.SIGKILL
    status, _, serve_err = serve.result()
    assert status == 0, serve_err
    tree.assert_counts_on(tree.mark())


RECONNECT = {"PYCR_NET_TIMEOUT": "2", "PYCR_NET_IDLE_TIMEOUT": "4", "PYCR_LAZY_RECONNECT": "15"}


class Moving:
    """A post-copy or hybrid migration (hybrid: two passes) whose replica runs with pages still at the
    source, on a link shaped to `rate` once the post-copy phase nears (hybrid's pre-copy pass goes at full
    speed: the pages its tree writes meanwhile are what is left for post-copy)."""

    def __init__(self, hosts, tmp_path, key, mode, rate, mib, per_s, env, serve_args=(), source_args=(),
                 serve_once=True):
        self.hosts = hosts
        self.serve = Serve(hosts, tmp_path, key, *serve_args, env=env, once=serve_once)
        self.tree = Tree(hosts, tmp_path, nproc=2, mib=mib, per_s=per_s)
        self.source_tmp = tmp_path / "src-tmp"      # where the source's pycr keeps its work directory
        self.source_tmp.mkdir()
        passes = ("--max-passes", "2") if mode == "hybrid" else ()
        if mode == "post-copy":
            hosts.shape(rate)
        self.m = migrate(hosts, self.tree, self.serve, key, "--mode", mode, *passes, *source_args,
                         env=dict(env, TMPDIR=str(self.source_tmp)))
        self.head = ""
        if mode == "hybrid":
            self.head = self.m.stdout.readline()
            assert self.head.startswith("pass 1 pre-dump"), self.head + self.m.stderr.read()
            hosts.shape(rate)
        wait_released(self.serve, self.m)

    def cut_for(self, seconds):
        self.hosts.cut()
        time.sleep(seconds)
        self.hosts.uncut()

    def communicate(self, timeout=60):
        out, err = self.m.communicate(timeout=timeout)
        return self.head + out, err

    def assert_won_back(self, serve_log=None):
        """The source dialled again and the post-copy phase went on to the last page: the replica's memory
        checks out -> pycr migrate's (stdout, stderr), serve's stderr (or its -o log, serve_log)."""
        out, err = self.communicate()
        assert self.m.returncode == 0, out + err
        assert "lost the destination after its replica started" in err and "connected to the destination again" \
            in err, out + err
        assert LAZY_LINE.search(out), out
        assert self.tree.proc.wait(timeout=10) == 128 + signal.SIGKILL
        status, _, serve_err = self.serve.result()
        if serve_log is not None:
            serve_err = serve_log.read_text()
        assert status == 0 and "reconnected to the source" in serve_err, serve_err
        self.tree.assert_counts_on(self.tree.mark())
        return out, err, serve_err


def test_a_link_cut_after_the_switch_is_won_back_by_the_source(two_hosts, tmp_path):
    """The link goes down while pages move (the replica runs, the source is held stopped) and comes back
    3 s later: the source, whose sends stopped, dials the destination again (never the other way) and the
    post-copy phase goes on to the last page; the replica's memory checks out."""
    # 16 MiB of buffers and the interpreters' heaps take about 2.5 s
    moving = Moving(two_hosts, tmp_path, secret(tmp_path), "post-copy", "100mbit", mib=8, per_s=0.02, env=RECONNECT)
    moving.cut_for(3)                   # longer than the source's 2 s send deadline
    moving.assert_won_back()


def test_a_link_cut_in_hybrids_post_copy_phase_is_won_back_by_the_source(two_hosts, tmp_path):
    """Hybrid: after its pre-copy pass and the switch, the pages written since that pass are still at the
    source when the link goes down for 3 s; the source wins it back and the replica gets them, and only
    them."""
    # what the tree writes during the pre-copy pass (some 4 MiB even when the pass is fast) takes about
    # 3 s at 10 Mbit/s: the cut comes with pages still to move
    moving = Moving(two_hosts, tmp_path, secret(tmp_path), "hybrid", "10mbit", mib=4, per_s=4.0, env=RECONNECT)
    moving.cut_for(3)
    out, _, serve_err = moving.assert_won_back()
    # the restore injected into tasks whose stack pages were among those left at the source
    assert "stays mapped" not in serve_err, serve_err
    passes = PASS_LINE.findall(out)
    assert [p[1] for p in passes] == ["pre-dump", "dump"] and int(passes[-1][5]) < 4 << 20, out
    lazy = LAZY_LINE.search(out)
    assert 0 < (int(lazy.group(1)) + int(lazy.group(3))) * 4096 < int(passes[0][5]), out


def test_a_link_down_past_the_reconnect_window_kills_the_replica(two_hosts, tmp_path):
    """Hybrid, after the switch: the link goes down and stays down past both sides' reconnect windows. The
    destination, hearing nothing from the source with pages still to come, gives the link up, waits its
    window and has the watchdog kill the replica, which never ran on a page it lacked; the source says in
    one line that its tree is left stopped, the one whole copy. Nothing else is left on either side."""
    env = dict(RECONNECT, PYCR_LAZY_RECONNECT="1")
    moving = Moving(two_hosts, tmp_path, secret(tmp_path), "hybrid", "10mbit", mib=4, per_s=4.0, env=env)
    tree, serve = moving.tree, moving.serve
    start = tree.mark()
    two_hosts.cut()
    try:
        out, err = moving.communicate(timeout=20)
        status, _, serve_err = serve.result(timeout=20)
    finally:
        two_hosts.uncut()
    assert moving.m.returncode == 1, out + err
    last = err.strip().splitlines()[-1]
    assert last.startswith("pycr: ") and "did not come back" in last and "left stopped" in last, err
    assert status == 1 and "killed" in serve_err and "lost the source" in serve_err, serve_err
    assert_destination_empty(serve)
    assert os.listdir(moving.source_tmp) == []
    # whatever the replica printed before it was killed, it printed from the right memory
    for line in tree.out.read_text().splitlines()[start:]:
        _, idx, _, steps, crc = line.split()
        assert crc == expected_crc(int(idx), tree.mib, int(steps)), line
    for pid in tree.pids:               # stopped, detached, without pycr's userfaultfds
        assert procutil.state(pid) == "T" and _untraced(pid), pid
        assert UFFD_LINK not in procutil.fds(pid).values()
        procutil.kill(pid, signal.SIGKILL)


def test_a_source_silent_with_pages_still_to_come_is_given_up_by_the_destination(two_hosts, tmp_path):
    """The source's pycr stops (SIGSTOP) while pages move, its connection open: no FIN, no reset, no
    byte, as a link cut between two frames. The destination gives the link up after the frame timeout,
    waits its reconnect window and has the replica killed. Continued, the source finds its destination
    gone and says in one line that its tree is left stopped."""
    env = dict(RECONNECT, PYCR_LAZY_RECONNECT="1")
    moving = Moving(two_hosts, tmp_path, secret(tmp_path), "post-copy", "100mbit", mib=16, per_s=0.02, env=env)
    procutil.kill(moving.m.pid, signal.SIGSTOP)
    try:
        status, _, serve_err = moving.serve.result(timeout=20)
    finally:
        procutil.kill(moving.m.pid, signal.SIGCONT)
    assert status == 1 and "sent nothing for 2 s while" in serve_err and "killed" in serve_err, serve_err
    assert_destination_empty(moving.serve)
    out, err = moving.communicate(timeout=20)
    assert moving.m.returncode == 1, out + err
    assert "did not come back" in err.strip().splitlines()[-1], err
    for pid in moving.tree.pids:
        assert procutil.state(pid) == "T" and _untraced(pid), pid
        procutil.kill(pid, signal.SIGKILL)


def test_a_source_back_after_its_replica_was_killed_is_told_and_runs_its_tree_again(two_hosts, tmp_path):
    """As above, but serve goes on listening (no --once) and the source's pycr comes back within its own
    window (twice the destination's): serve remembers that this migration's replica is dead and says so
    (REPLICA_GONE) on the source's new connection; the source thaws its tree, which goes on counting with
    its memory intact, and its migrate says in one line what happened. It stayed stopped before."""
    env = dict(RECONNECT, PYCR_LAZY_RECONNECT="2")          # the destination's window 2 s, the source's 4 s
    moving = Moving(two_hosts, tmp_path, secret(tmp_path), "post-copy", "100mbit", mib=16, per_s=0.02, env=env,
                    serve_once=False)
    serve, tree = moving.serve, moving.tree
    said = []
    reader = threading.Thread(target=lambda: said.extend(iter(serve.proc.stderr.readline, "")), daemon=True)
    reader.start()
    procutil.kill(moving.m.pid, signal.SIGSTOP)
    try:
        assert procutil.wait_until(lambda: any("migration failed" in line for line in said), timeout=20), said
    finally:
        procutil.kill(moving.m.pid, signal.SIGCONT)
    out, err = moving.communicate(timeout=30)
    assert moving.m.returncode == 1, out + err
    last = err.strip().splitlines()[-1]
    assert last.startswith("pycr: ") and "REPLICA_GONE" in last and "runs again" in last, err
    for pid in tree.pids:               # running, detached, without pycr's userfaultfds
        assert procutil.state(pid) not in ("t", "T") and _untraced(pid), pid
        assert UFFD_LINK not in procutil.fds(pid).values()
    tree.assert_counts_on(tree.mark())
    procutil.kill(serve.pid(), signal.SIGTERM)
    reader.join(30)
    assert any("told it so" in line for line in said), said
    assert any(line.startswith("exit ") for line in said), said
    assert_destination_empty(serve)
    for pid in tree.pids:
        procutil.kill(pid, signal.SIGKILL)


def test_serve_stopped_alone_after_the_switch_gives_the_tree_back(two_hosts, tmp_path):
    """SIGTERM to serve's PID alone (as `kill PID` or a service manager sends it) while pages move: serve
    said the replica was discarded, but its lazy-pages daemon went on and the replica ran. Now serve
    stops its daemon as a signal to the whole group does: the replica is killed, the source is told
    (REPLICA_GONE) and runs its tree again, and both say so."""
    moving = Moving(two_hosts, tmp_path, secret(tmp_path), "post-copy", "100mbit", mib=16, per_s=0.02,
                    env=RECONNECT)
    serve, tree = moving.serve, moving.tree
    procutil.kill(serve.pid(), signal.SIGTERM)
    status, _, serve_err = serve.result(timeout=30)
    assert status != 0 and "interrupted by SIGTERM" in serve_err and "discarded" in serve_err, serve_err
    out, err = moving.communicate(timeout=30)
    assert moving.m.returncode == 1, out + err
    assert "REPLICA_GONE" in err.strip().splitlines()[-1] and "runs again" in err, err
    assert_destination_empty(serve)
    for pid in tree.pids:
        assert procutil.state(pid) not in ("t", "T") and _untraced(pid), pid
        assert UFFD_LINK not in procutil.fds(pid).values()
    tree.assert_counts_on(tree.mark())
    for pid in tree.pids:
        procutil.kill(pid, signal.SIGKILL)


def _stranger(hosts, serve, key=None):
    """A pycr channel from the source's namespace to serve's port, through its hello, and
    authenticated with the secret file `key` if given."""
    chan = ch.Channel(hosts.connect(hosts.src_ns, hosts.dst_addr, serve.port), "destination", timeouts=(5, 5))
    chan.hello(Role.MIGRATE_SOURCE, {Role.MIGRATE_DEST})
    if key is not None:
        auth.client_handshake(chan, auth.read_secret(key))
    return chan


def test_strangers_on_serves_port_do_not_delay_the_post_copy_faults(two_hosts, tmp_path):
    """While the replica faults on pages still at the source, strangers connect to serve's port, where the
    source would come back after a lost link: one that sends nothing and stays, one that sends garbage and
    stays, one that fails the challenge, and an authenticated one naming another migration. Each is
    handled on its own, with its own deadline (PYCR_NET_TIMEOUT, set far longer than the migration
    takes): none holds the replica's faults, the migration ends well before that deadline, the replica's
    memory checks out, and serve says why it refused each."""
    env = {"PYCR_NET_TIMEOUT": "60", "PYCR_NET_IDLE_TIMEOUT": "60"}
    key = secret(tmp_path)
    serve = Serve(two_hosts, tmp_path, key, env=env)
    two_hosts.shape("30mbit")           # the pages take about 6 s: the replica faults meanwhile
    tree = Tree(two_hosts, tmp_path, nproc=2, mib=4, per_s=0.2)
    m = migrate(two_hosts, tree, serve, key, "--mode", "post-copy", env=env)
    wait_released(serve, m)
    started = time.monotonic()
    silent = two_hosts.connect(two_hosts.src_ns, two_hosts.dst_addr, serve.port)
    garbage = two_hosts.connect(two_hosts.src_ns, two_hosts.dst_addr, serve.port)
    garbage.sendall(b"GET / HTTP/1.0\r\n\r\n")
    with pytest.raises(ch.AuthError, match="proof was refused"):
        _stranger(two_hosts, serve, secret(tmp_path, "wrong"))
    with _stranger(two_hosts, serve, key) as other:
        other.send(FrameType.MIGRATION, {"id": os.urandom(16), "root_pid": 1})
        with pytest.raises(ch.PeerFailed, match="busy: the post-copy phase of another migration runs here"):
            other.recv(FrameType.RUNNING)
    assert m.poll() is None, "the post-copy phase ended before the strangers came: nothing was tested"
    out, err = m.communicate(timeout=30)
    assert m.returncode == 0, out + err
    lazy = LAZY_LINE.search(out)
    assert lazy and int(lazy.group(2)) > 0, out
    # held by a stranger's hello, faults would wait out its 60 s deadline
    assert time.monotonic() - started < 20 and float(lazy.group(6)) < 20e6, out
    status, _, serve_err = serve.result()
    assert status == 0, serve_err
    refused = [line for line in serve_err.splitlines() if "refused a connection on serve's port" in line]
    for why in ("not a pycr peer (its first bytes are b'GET / HT')", "failed authentication",
                "not the source of this migration", "still in its hello and authentication when the migration ended"):
        assert sum(why in line for line in refused) == 1, serve_err
    for sock in (silent, garbage):      # closed by serve: nothing is left waiting on them
        sock.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            while sock.recv(4096):
                pass
        sock.close()
    tree.assert_counts_on(tree.mark())


@pytest.mark.big
@pytest.mark.skipif(bool(os.environ.get("PYCR_SKIP_BIG")), reason="1 GiB migrations skipped: PYCR_SKIP_BIG is set")
@pytest.mark.parametrize("mode", ["pre-copy", "post-copy", "hybrid"])
def test_a_gib_writer_moves_in_each_mode(two_hosts, tmp_path, workloads, mode):
    """1 GiB, 1 % of its pages rewritten a second, over the unshaped link: the replica goes on writing,
    and on SIGUSR1 it finds every page as its writes left it (a page lost, zero or stale fails)."""
    key = secret(tmp_path)
    serve = Serve(two_hosts, tmp_path, key)
    status = tmp_path / "writer.txt"
    status.touch()
    writer = two_hosts.source([workloads["pagewriter"], status, 1024, 1], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    assert procutil.wait_until(lambda: "writes" in status.read_text(), timeout=30), status.read_text()
    before = int(re.findall(r"^writes (\d+)$", status.read_text(), re.M)[-1])
    passes = ("--max-passes", "3") if mode != "post-copy" else ()
    m = two_hosts.source(two_hosts.pycr("migrate", "-t", writer.pid, "--to", serve.address, "--secret-file", key,
                                        "--mode", mode, *passes), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    out, err = m.communicate(timeout=90)
    assert m.returncode == 0, out + err
    print(out)
    assert writer.wait(timeout=10) == -signal.SIGKILL
    assert serve.result()[0] == 0
    replica = [p for p in serve.replica() if (procutil._read(f"/proc/{p}/comm") or b"").strip() == b"pagewriter"]
    assert len(replica) == 1, serve.replica()
    start = len(status.read_text())
    procutil.kill(replica[0], signal.SIGUSR1)
    assert procutil.wait_until(lambda: re.search(r"^(verified|bad) ", status.read_text()[start:], re.M),
                               timeout=30), status.read_text()[start:]
    verdict = re.search(r"^(verified|bad) .*$", status.read_text()[start:], re.M).group(0)
    assert verdict.startswith("verified ") and int(verdict.split()[1]) >= before, verdict


def test_a_destination_stopped_before_the_switch_says_why_through_its_daemon(two_hosts, tmp_path):
    """serve is stopped (SIGTERM) just before its replica would run, the link up: its lazy-pages daemon
    holds the connection by then, and sends serve's reason; the source thaws and says it."""
    key = secret(tmp_path)
    serve, tree, m = _post_copy_held_before_the_switch(two_hosts, tmp_path, key)
    procutil.kill(serve.pid(), signal.SIGTERM)
    out, err = m.communicate(timeout=30)
    assert m.returncode == 1, out + err
    assert "pycr serve was interrupted by SIGTERM" in err and "thawed" in err, err
    # (serve's discarding of its replica is test_link_cut_before_the_switch_leaves_the_source_running's)
    for pid in tree.pids:
        procutil.assert_running_untraced(pid)
    tree.assert_counts_on(tree.mark())
