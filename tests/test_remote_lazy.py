"""Remote lazy restore over loopback: `pycr dump --lazy-pages` serves the pages of a frozen tree to
`pycr lazy-pages --page-server`, and `pycr restore --lazy-pages --pidns` runs the replica next to
the frozen source (which holds the original PIDs).

Each test checks what a user would: the replica's memory checksums after it touched every page,
bytes it wrote from a missing page with write(2), the source tree killed after the last page moved,
thawed and counting on when the destination goes away before its replica ran, and a replica killed
rather than run on zero pages when the source dies after it started.
"""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

import procutil
from pycrcmd import pycr
from workload_prelude import WORKLOAD_PRELUDE
from test_lazy_pages import DROP_SCRIPT, SLOW_SCRIPT, tree_script

FIGURES = re.compile(r"lazy-pages: (\d+) pages placed \((\d+) on (\d+) faults, (\d+) pushed\).*fault median "
                     r"([\d.]+) us, p99 ([\d.]+) us; ([\d.]+) MiB from the source \((?:(\d+) chunks? fetched ahead of the push "
                     r"for faults|every fault found its chunk already pushed)\), "
                     r"background push ([\d.]+) MiB/s")

TREE_SCRIPT = tree_script(24, 16, 8)        # a parent, a child forked before the dump and a thread: 48 MiB


@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(os.urandom(32).hex().encode())
    path.chmod(0o600)
    return path


@pytest.fixture
def procs():
    """start(*args, env=None) -> Popen of `pycr ARGS`; killed at teardown."""
    started = []

    def start(*args, env=None):
        p = subprocess.Popen([sys.executable, "-m", "pycr", *map(str, args)], env=dict(os.environ, **(env or {})),
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(p)
        return p

    yield start
    for p in started:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=30)


def twins(pids):
    """{original pid: outer pid} of the processes that are `pids` inside a child PID namespace."""
    out = {}
    for outer in procutil.all_pids():
        st = procutil.status(outer)
        ns = st.get("NSpid", "").split() if st else []
        if len(ns) == 2 and int(ns[1]) in pids and outer not in pids:
            out[int(ns[1])] = outer
    return out


def replica_says(w, pattern, mark, timeout=30):
    """The match of the first line the replica reported since mark (the original w.pid may be gone)."""
    def find():
        return next((m for m in map(re.compile(pattern).match, w.lines(mark)) if m), None)
    m = procutil.wait_until(find, timeout)
    assert m, (pattern, w.lines(mark)[-10:])
    return m


def start_tree(spawn_python, cleanup_pids):
    """TREE_SCRIPT running and counting -> (workload, sorted pids of its two processes)."""
    w = spawn_python("remotelazy", TREE_SCRIPT)
    child = int(w.wait_for(r"^child ready (\d+)$").group(1))
    w.wait_for(r"^count parent 10$")
    pids = sorted([w.pid, child])
    cleanup_pids.add(*pids)
    return w, pids


def lazy_source(procs, w, img, secret, env=None):
    """`pycr dump --lazy-pages` of w's tree on a free loopback port -> (Popen, port), once the set is sealed."""
    src = procs("dump", "-t", w.pid, "-D", img, "--lazy-pages", "--address", "127.0.0.1", "--port", 0,
                "--secret-file", secret, env=env)
    line = src.stdout.readline()
    m = re.search(r"serving lazy pages on 127\.0\.0\.1:(\d+)", line)
    assert m, (line, src.stderr.read() if src.poll() is not None else "")
    return src, int(m.group(1))


def destination(procs, img, copy, port, secret, env=None):
    """The set copied (holes stay holes) and `pycr lazy-pages --page-server` started on it, listening."""
    subprocess.run(["cp", "-a", "--sparse=always", str(img), str(copy)], check=True)
    d = procs("lazy-pages", "-D", copy, "--page-server", "--address", "127.0.0.1", "--port", port,
              "--secret-file", secret, env=env)
    sock = os.path.join(copy, "lazy-pages.sock")
    assert procutil.wait_until(lambda: os.path.exists(sock) or d.poll() is not None, 30)
    assert d.poll() is None, d.communicate()
    return d


def test_a_tree_moves_lazily_and_the_source_is_killed_after_the_last_page(
        spawn_python, tmp_path, cleanup_pids, procs, secret):
    w, pids = start_tree(spawn_python, cleanup_pids)
    src, port = lazy_source(procs, w, tmp_path / "img", secret)
    # Only what is not anonymous memory was written: the 48 MiB stay in the frozen task.
    written = sum(os.stat(tmp_path / "img" / f).st_blocks * 512 for f in os.listdir(tmp_path / "img"))
    assert written < 16 << 20, written
    assert all(procutil.state(p) in ("t", "T") for p in pids)
    last = int(w.last("count parent").split()[-1])
    d = destination(procs, tmp_path / "img", tmp_path / "dst", port, secret)
    mark = w.mark()
    pycr("restore", "-D", tmp_path / "dst", "-d", "--lazy-pages", "--pidns")
    replica = twins(pids)
    assert sorted(replica) == pids
    cleanup_pids.add(*replica.values(), *(procutil.ppid(p) for p in replica.values()))
    for outer in replica.values():          # every page checked at once, while the push goes on
        os.kill(outer, signal.SIGUSR1)
    # The source is killed once the last page moved, which may come before these lines:
    # wait on the replica's output, not on the source's PID.
    for who in ("parent", "child", "parent-thread"):
        replica_says(w, rf"^sum {who} (ok|bad)$", mark, timeout=60)
    assert not [line for line in w.lines(mark) if line.endswith("bad")], w.lines(mark)
    replica_says(w, rf"^count parent {last + 20}$", mark)
    out, err = d.communicate(timeout=60)
    assert d.returncode == 0, err
    m = FIGURES.search(out)
    assert m, out
    placed, faults, on_request = int(m.group(1)), int(m.group(3)), int(m.group(8) or 0)
    assert placed * 4096 >= 48 << 20 and faults > 0 and on_request > 0
    print(f"\nremote lazy figures: {m.group(0)}")
    src_out, src_err = src.communicate(timeout=60)
    assert src.returncode == 0, src_err
    assert "then killed" in src_out
    assert procutil.wait_gone(pids, timeout=10) == []      # the source tree, after its last page moved
    replica_says(w, rf"^count parent {last + 40}$", mark)   # the replica goes on without it


def test_a_restore_started_late_finds_its_daemon_still_connected(spawn_python, tmp_path, cleanup_pids, procs, secret):
    """The source streams only from the commit on, so a daemon waiting for its restore hears nothing:
    with no fault waiting that silence is no lost link, however long it lasts (here twice the frame
    timeout), and the late restore moves the tree."""
    w, pids = start_tree(spawn_python, cleanup_pids)
    src, port = lazy_source(procs, w, tmp_path / "img", secret)
    d = destination(procs, tmp_path / "img", tmp_path / "dst", port, secret, env={"PYCR_NET_TIMEOUT": "2"})
    time.sleep(4)
    assert d.poll() is None, d.communicate()
    last = int(w.last("count parent").split()[-1])
    mark = w.mark()
    pycr("restore", "-D", tmp_path / "dst", "-d", "--lazy-pages", "--pidns")
    replica = twins(pids)
    cleanup_pids.add(*replica.values(), *(procutil.ppid(p) for p in replica.values()))
    replica_says(w, rf"^count parent {last + 20}$", mark)
    out, err = d.communicate(timeout=60)
    assert d.returncode == 0, err
    src.communicate(timeout=60)
    assert src.returncode == 0


def test_kernel_mode_fault_served_from_the_source(spawn_python, tmp_path, cleanup_pids, procs, secret):
    w = spawn_python("remotedrop", DROP_SCRIPT)
    w.wait_for(r"^ready \d+$")
    cleanup_pids.add(w.pid)
    src, port = lazy_source(procs, w, tmp_path / "img", secret)
    d = destination(procs, tmp_path / "img", tmp_path / "dst", port, secret, env={"PYCR_LAZY_PUSH_DELAY": "4"})
    mark = w.mark()
    pycr("restore", "-D", tmp_path / "dst", "-d", "--lazy-pages", "--pidns")
    replica = twins({w.pid})
    cleanup_pids.add(*replica.values(), *(procutil.ppid(p) for p in replica.values()))
    os.kill(replica[w.pid], signal.SIGUSR1)
    w.wait_for(r"^dropped True$", start=mark)
    # write(2) read the missing pages in the kernel: fetched from the source and served, not EFAULT.
    assert w.fields("piped", mark) == [["65536", "ok"]]
    assert w.fields("forked", mark) == [["ok"]]
    out, err = d.communicate(timeout=60)
    assert d.returncode == 0, err
    assert src.wait(timeout=30) == 0
    os.kill(replica[w.pid], signal.SIGUSR1)
    assert replica_says(w, r"^zeros (\S+) (\S+) rest (\S+)$", mark).groups() == ("True", "True", "ok")


def test_source_killed_after_the_replica_started_kills_the_replica(
        spawn_python, tmp_path, cleanup_pids, procs, secret):
    w = spawn_python("remoteslow", SLOW_SCRIPT)
    w.wait_for(r"^ready \d+$")
    cleanup_pids.add(w.pid)
    env = {"PYCR_LAZY_RECONNECT": "2"}
    src, port = lazy_source(procs, w, tmp_path / "img", secret, env=env)
    d = destination(procs, tmp_path / "img", tmp_path / "dst", port, secret,
                    env=dict(env, PYCR_LAZY_PUSH_DELAY="600"))
    mark = w.mark()
    pycr("restore", "-D", tmp_path / "dst", "-d", "--lazy-pages", "--pidns")
    replica = twins({w.pid})
    cleanup_pids.add(*replica.values(), *(procutil.ppid(p) for p in replica.values()))
    # Running (3 reports: 300 pages touched), most of its pages still at the source.
    assert procutil.wait_until(lambda: len(w.fields("touched", mark)) >= 3, 30), w.lines(mark)
    src.kill()
    src.wait(timeout=10)
    # The daemon retries for 2 s, gives up, and its watchdog kills the replica: never zero pages.
    assert procutil.wait_until(lambda: not procutil.exists(replica[w.pid]), 20), "the replica outlived its source"
    assert not [line for line in w.lines(mark) if line.startswith("bad")]
    out, err = d.communicate(timeout=30)
    assert d.returncode == 1 and "lost the source" in err, err
    # The source tree was held stopped from the commit on: it does not run next to a replica.
    assert procutil.state(w.pid) == "T"


def test_destination_gone_before_the_replica_ran_thaws_the_source(
        spawn_python, tmp_path, cleanup_pids, procs, secret):
    w = spawn_python("remotethaw", SLOW_SCRIPT)
    w.wait_for(r"^touched 100$")
    cleanup_pids.add(w.pid)
    src, port = lazy_source(procs, w, tmp_path / "img", secret)
    d = destination(procs, tmp_path / "img", tmp_path / "dst", port, secret)
    d.kill()
    d.wait(timeout=10)
    out, err = src.communicate(timeout=30)
    assert src.returncode == 1 and "the tree was thawed" in err, err
    mark = w.mark()
    last = int(w.last("touched").split()[-1])
    w.wait_for(rf"^touched {last + 200}$", start=mark)
    assert not [line for line in w.lines(mark) if line.startswith("bad")]
    procutil.assert_running_untraced(w.pid)


def test_source_killed_before_the_replica_ran_leaves_the_tree_running(
        spawn_python, tmp_path, cleanup_pids, procs, secret):
    w = spawn_python("remotekill", SLOW_SCRIPT)
    w.wait_for(r"^touched 100$")
    cleanup_pids.add(w.pid)
    src, _port = lazy_source(procs, w, tmp_path / "img", secret)
    src.kill()
    src.wait(timeout=10)
    mark = w.mark()
    w.wait_for(r"^touched \d+$", start=mark)
    assert not [line for line in w.lines(mark) if line.startswith("bad")]
    procutil.assert_running_untraced(w.pid)


def test_wrong_secret_refused(spawn_python, tmp_path, cleanup_pids, procs, secret):
    w = spawn_python("remotesecret", SLOW_SCRIPT)
    w.wait_for(r"^ready \d+$")
    cleanup_pids.add(w.pid)
    src, port = lazy_source(procs, w, tmp_path / "img", secret)
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"not the secret")
    wrong.chmod(0o600)
    shutil.copytree(tmp_path / "img", tmp_path / "dst")
    p = pycr("lazy-pages", "-D", tmp_path / "dst", "--page-server", "--address", "127.0.0.1", "--port", port,
             "--secret-file", wrong, expect=1)
    assert "secret" in p.stderr, p.stderr
    # The source refused it and goes on waiting for its destination: the tree is still frozen.
    assert src.poll() is None
    assert procutil.state(w.pid) in ("t", "T")
    # A plain restore of a lazy dump is refused: its anonymous pages are not in the set.
    p = pycr("restore", "-D", tmp_path / "dst", "-d", "--pidns", expect=1)
    assert "--lazy-pages" in p.stderr


def test_destination_interrupted_after_the_replica_started_gives_the_tree_back(
        spawn_python, tmp_path, cleanup_pids, procs, secret):
    """Ctrl-C of `lazy-pages --page-server` once the replica runs: its watchdog kills the replica and sees
    every task exit, then the daemon tells the source (REPLICA_GONE), which runs its tree again (the one
    copy, whole) instead of leaving it stopped."""
    w = spawn_python("remotegiveback", SLOW_SCRIPT)
    w.wait_for(r"^ready \d+$")
    cleanup_pids.add(w.pid)
    src, port = lazy_source(procs, w, tmp_path / "img", secret)
    d = destination(procs, tmp_path / "img", tmp_path / "dst", port, secret, env={"PYCR_LAZY_PUSH_DELAY": "600"})
    mark = w.mark()
    pycr("restore", "-D", tmp_path / "dst", "-d", "--lazy-pages", "--pidns")
    replica = twins({w.pid})
    cleanup_pids.add(*replica.values(), *(procutil.ppid(p) for p in replica.values()))
    # The replica runs (300 pages touched), most of its pages still at the source; the source is held stopped.
    assert procutil.wait_until(lambda: len(w.fields("touched", mark)) >= 3, 30), w.lines(mark)
    assert procutil.state(w.pid) in ("t", "T")
    d.send_signal(signal.SIGINT)
    out, err = d.communicate(timeout=30)
    assert d.returncode == 128 + signal.SIGINT, err
    assert "the source runs its tree again" in err, err
    assert not procutil.exists(replica[w.pid]) or procutil.is_zombie(replica[w.pid])
    src_out, src_err = src.communicate(timeout=30)
    assert src.returncode == 1 and "the source tree runs again" in src_err, src_err
    assert len(src_err.strip().splitlines()) == 1, src_err
    # Running again, untraced, not stopped, its memory right: it goes on walking and checking its pages.
    procutil.assert_running_untraced(w.pid)
    mark = w.mark()
    assert procutil.wait_until(lambda: len(w.fields("touched", mark)) >= 3, 30), w.lines(mark)
    assert procutil.state(w.pid) not in ("t", "T")
    assert not [line for line in w.lines() if line.startswith("bad")], w.lines()


@contextlib.contextmanager
def speaking_as_daemon(src, port, img, pids, secret):
    """The test speaks the daemon's side: connected, authenticated, LAZY_OPEN for every chunk of pids
    answered with LAZY_READY -> the channel. At the end ALL_PLACED: the source kills the tree and
    exits 0."""
    from pycr import manifest
    from pycr.formats.wire import FrameType, Role
    from pycr.net import auth
    channel = auth.connect("127.0.0.1", port, "lazy source", Role.LAZY_DAEMON, {Role.LAZY_SOURCE},
                           auth.credentials(secret))
    try:
        channel.send(FrameType.LAZY_OPEN, {"set_id": bytes(manifest.read(img).set_id), "resumed": 0,
                                           "wanted": [{"pid": pid, "bitmap": b"\xff" * 64} for pid in pids]})
        channel.recv(FrameType.LAZY_READY, idle=True)
        yield channel
        channel.send(FrameType.ALL_PLACED, {})
        channel.recv(FrameType.TREE_KILLED)
    finally:
        channel.close()
    _out, err = src.communicate(timeout=60)
    assert src.returncode == 0, err
    assert procutil.wait_gone(pids, timeout=10) == []


def test_before_the_commit_only_the_chunks_asked_for_move(spawn_python, tmp_path, cleanup_pids, procs, secret):
    """Until the daemon says RESUMING (the replica is about to run), the source sends only the chunks a
    fault asks for: the restore's own faults make the downtime, and a background stream ahead of them
    in the socket buffers (about a megabyte) would delay each by as long as that takes on the link.
    From RESUMING on, the rest streams. The daemon's side is spoken by the test."""
    from pycr.formats.wire import FrameType
    w, pids = start_tree(spawn_python, cleanup_pids)
    src, port = lazy_source(procs, w, tmp_path / "img", secret)
    with speaking_as_daemon(src, port, tmp_path / "img", pids, secret) as channel:
        assert not channel.readable(1), "the source streamed before the commit"
        channel.send(FrameType.PAGE_REQUEST, {"pid": pids[0], "index": 3})
        got = channel.recv(FrameType.PAGE_CHUNK).body
        assert (got.pid, got.index) == (pids[0], 3)
        assert not channel.readable(1), "the source streamed before the commit"
        channel.send(FrameType.RESUMING, {})
        channel.recv(FrameType.RESUMING_OK)
        seen = {(got.pid, got.index)}
        while channel.readable(3):
            body = channel.recv(FrameType.PAGE_CHUNK).body
            seen.add((body.pid, body.index))
        assert len(seen) * (256 << 10) >= 48 << 20          # then every chunk of the 48 MiB came


def test_a_fault_on_a_chunk_already_sent_gets_no_second_copy(spawn_python, tmp_path, cleanup_pids, procs, secret):
    """A replica that faults on a page whose chunk is on its way (in the socket buffers or on
    the link) asks for it: the source must not send it again. Sending it again put every chunk
    on the link twice while a replica touched its memory in order (1.8x the memory, half the
    link's rate). Here the daemon's side is spoken by the test: it asks three times for the
    first chunk it received, reads every chunk, and counts each."""
    from pycr.formats.wire import FrameType
    w, pids = start_tree(spawn_python, cleanup_pids)
    src, port = lazy_source(procs, w, tmp_path / "img", secret)
    with speaking_as_daemon(src, port, tmp_path / "img", pids, secret) as channel:
        channel.send(FrameType.RESUMING, {})        # the stream starts at the commit point
        channel.recv(FrameType.RESUMING_OK)
        seen = {}
        first = channel.recv(FrameType.PAGE_CHUNK).body
        seen[(first.pid, first.index)] = 1
        for _ in range(3):
            channel.send(FrameType.PAGE_REQUEST, {"pid": first.pid, "index": first.index})
        while channel.readable(3):
            got = channel.recv(FrameType.PAGE_CHUNK).body
            seen[(got.pid, got.index)] = seen.get((got.pid, got.index), 0) + 1
        assert len(seen) * (256 << 10) >= 48 << 20          # every chunk of the 48 MiB came
        assert {k: n for k, n in seen.items() if n > 1} == {}


def test_a_fault_whose_chunk_landed_meanwhile_asks_nothing_and_nothing_follows_the_end(
        spawn_python, tmp_path, cleanup_pids, procs, secret):
    """The fault server writes a fault's (file, chunk) on a pipe; the chunk may land from the stream
    before the fetcher reads it. That request must not go: at the end, when the last page placed sent
    ALL_PLACED, a request sent after it met a source that took only the end (a migration's source
    failed with "sent a PAGE_REQUEST frame where pycr expected RUNNING or LAZY_DONE" while its
    replica ran). Here the daemon's fetcher runs in the test with its real fault server, no replica:
    every chunk lands, a request for one of them is put in the pipe, then the end is said."""
    from pycr.lazy.remote import REQUEST, RemotePages
    from pycr.native.core import FaultServer
    from pycr.net import auth
    w, pids = start_tree(spawn_python, cleanup_pids)
    src, port = lazy_source(procs, w, tmp_path / "img", secret)
    pages = RemotePages(tmp_path / "img", "127.0.0.1", port, auth.credentials(secret))
    server = FaultServer(pages.files(), pages.chunk, remote=pages.remote())
    try:
        pages.attach(server)
        pages.resuming()                        # the commit: the stream starts
        assert procutil.wait_until(lambda: pages._to_come == 0, 30), pages._to_come
        os.write(pages._req_w, REQUEST.pack(0, 0))  # a fault's request whose chunk has landed meanwhile
        pages.finished()
        assert pages.killed and pages.failure() is None
        pages._thread.join(10)
        assert pages.requested == 0
    finally:
        pages.close()
        server.close()
    _out, err = src.communicate(timeout=60)
    assert src.returncode == 0, err
    assert procutil.wait_gone(pids, timeout=10) == []
