"""criu's page server on loopback: `pycr dump --page-server` sends the pages files to `pycr page-server`,
the rest stays local; with the server's files copied next to the rest, the restored tree goes on with
its memory intact. Wrong secrets, foreign peers, silent peers, a full disk and a killed server are
refused in one line, in bounded time, with the tree left running as it was."""

import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import procutil
from kernel import require_tracker
from pycrcmd import one_line_error, pycr
from workload_prelude import WORKLOAD_PRELUDE

from pycr.formats import wire

# Three processes, each with 4 MiB of seeded data of its own (the children also hold the root's,
# copied on write); each counts, and reports the SHA-256 of its data at SIGUSR1.
TREE = WORKLOAD_PRELUDE + r"""
import hashlib, random
want = []
signal.signal(signal.SIGUSR1, lambda *a: want.append(1))
def run(seed):
    data = bytearray(random.Random(seed).randbytes(4 << 20))
    report("proc %d" % os.getpid())
    n = 0
    while True:
        if want:
            want.clear()
            report("sum %d %s" % (os.getpid(), hashlib.sha256(data).hexdigest()))
        n += 1
        report("count %d %d" % (os.getpid(), n))
        time.sleep(0.02)
kids = []
for seed in (1, 2):
    pid = os.fork()
    if pid == 0:
        run(seed)
    kids.append(pid)
while len([l for l in open(sys.argv[1]).read().splitlines() if l.startswith("proc ")]) < 2:
    time.sleep(0.01)
report("ready %d" % os.getpid())
run(0)
"""

SERVER_START = 20


def secret_file(tmp_path, text="s3cret of the page server\n", name="secret", mode=0o600):
    path = tmp_path / name
    path.write_text(text)
    path.chmod(mode)
    return path


class PageServer:
    """`pycr page-server --port 0` started as a user would; `port` is the one it printed."""

    def __init__(self, directory, secret, *extra, env=None):
        self.directory = directory
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pycr", "page-server", "-D", str(directory), "--port", "0",
             "--address", "127.0.0.1", "--secret-file", str(secret), *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, **(env or {})))
        ready, _, _ = select.select([self.proc.stdout], [], [], SERVER_START)
        line = self.proc.stdout.readline() if ready else ""
        if "listening on 127.0.0.1:" not in line:
            self.proc.kill()
            raise AssertionError(f"page server did not start: {line!r} {self.proc.stderr.read()}")
        self.port = int(line.rsplit(":", 1)[1])

    def finish(self, timeout=30):
        """(exit status, stdout, stderr) once it has exited (within timeout)."""
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=30)


@pytest.fixture
def servers():
    started = []

    def start(directory, secret, *extra, env=None):
        s = PageServer(directory, secret, *extra, env=env)
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill()


def start_tree(spawn_python):
    w = spawn_python("paged", TREE)
    assert len(w.pids()) == 3
    return w


def sums(w):
    """{pid: SHA-256 of its data} reported at SIGUSR1."""
    start = w.mark()
    pids = w.pids()
    for pid in pids:
        procutil.kill(pid, signal.SIGUSR1)
    for pid in pids:
        w.wait_for(rf"^sum {pid} ", start=start, timeout=20, root=False)
    return {int(f[0]): f[1] for f in w.fields("sum", start)}


def counting(w, pids):
    """Every pid reports new counts, higher than before."""
    last = {pid: max([int(f[1]) for f in w.fields("count") if int(f[0]) == pid] or [0]) for pid in pids}
    start = w.mark()        # after `last`: a line written in between would be both, and not higher
    for pid in pids:
        m = w.wait_for(rf"^count {pid} (\d+)$", start=start, timeout=10, root=False)
        assert int(m.group(1)) > last[pid]


def dump_args(w, imgdir, server, secret, *extra):
    return ("dump", "-t", w.pid, "-D", imgdir, "--page-server", "--address", "127.0.0.1",
            "--port", server.port, "--secret-file", secret, *extra)


def files(directory):
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def pages_files(directory):
    return [n for n in files(directory) if n.startswith("pages-")]


def assert_untouched(w, pids):
    procutil.assert_running_untraced(*pids)
    counting(w, pids)


def test_dump_through_the_page_server_then_restore(spawn_python, tmp_path, servers, cleanup_pids):
    w = start_tree(spawn_python)
    pids = w.pids()
    before = sums(w)
    secret = secret_file(tmp_path)
    server = servers(tmp_path / "server", secret)
    imgdir = tmp_path / "img"
    out = pycr(*dump_args(w, imgdir, server, secret)).stdout
    assert "pages files (3) at the page server 127.0.0.1:" in out
    rc, sout, serr = server.finish()
    assert rc == 0, serr
    assert "page-server: 3 pages files" in sout
    assert not procutil.wait_gone(pids)

    # The pages went to the server, under the names the set expects; everything else is local.
    assert pages_files(tmp_path / "server") == sorted(f"pages-{p}.img" for p in pids)
    assert pages_files(imgdir) == [] and "manifest.img" in files(imgdir)
    assert sum(os.path.getsize(tmp_path / "server" / n) for n in files(tmp_path / "server")) > 12 << 20

    # Without them the set is refused by name; with them copied next to the rest it restores.
    cleanup_pids.add(*pids)
    refused = pycr("restore", "-D", imgdir, "-d", expect=1)
    assert f"pages-{pids[0]}.img: missing (manifest.img lists it)" in one_line_error(refused)
    for name in pages_files(tmp_path / "server"):
        shutil.copy2(tmp_path / "server" / name, imgdir / name)
    pycr("restore", "-D", imgdir, "-d")
    assert sums(w) == before
    counting(w, pids)


def test_a_corrupted_page_on_the_server_is_caught_by_the_restore(spawn_python, tmp_path, servers,
                                                                  cleanup_pids):
    w = start_tree(spawn_python)
    pids = w.pids()
    secret = secret_file(tmp_path)
    server = servers(tmp_path / "server", secret)
    imgdir = tmp_path / "img"
    pycr(*dump_args(w, imgdir, server, secret, "-R"))
    assert server.finish()[0] == 0
    for name in pages_files(tmp_path / "server"):
        shutil.copy2(tmp_path / "server" / name, imgdir / name)
    victim = imgdir / f"pages-{pids[1]}.img"
    with open(victim, "r+b") as f:
        f.seek(3 << 20)
        byte = f.read(1)
        f.seek(3 << 20)
        f.write(bytes([byte[0] ^ 1]))
    refused = pycr("restore", "-D", imgdir, "-d", expect=1)
    assert f"pages-{pids[1]}.img: checksum mismatch in bytes 3145728-" in one_line_error(refused)
    assert_untouched(w, pids)


@pytest.mark.parametrize("tracker", ["uffd-wp", "hash"])
def test_pre_dump_and_dump_chain_through_page_servers(spawn_python, tmp_path, servers, cleanup_pids, tracker):
    """uffd-wp copies with the C core (staged in a memfd, then sent); hash writes page by page from Python."""
    require_tracker(tracker)
    w = start_tree(spawn_python)
    pids = w.pids()
    before = sums(w)
    secret = secret_file(tmp_path)
    first = servers(tmp_path / "server-1", secret)
    pycr("pre-dump", *dump_args(w, tmp_path / "img" / "1", first, secret, "--tracker", tracker)[1:])
    assert first.finish()[0] == 0
    second = servers(tmp_path / "server-2", secret)
    pycr(*dump_args(w, tmp_path / "img" / "2", second, secret, "--prev-images-dir", "../1", "--tracker", tracker))
    assert second.finish()[0] == 0
    assert not procutil.wait_gone(pids)

    sizes = [sum(os.path.getsize(tmp_path / d / n) for n in pages_files(tmp_path / d))
             for d in ("server-1", "server-2")]
    assert sizes[0] > 12 << 20 and sizes[1] < sizes[0] // 4, sizes     # the dump sent only what changed
    for n in ("1", "2"):
        for name in pages_files(tmp_path / f"server-{n}"):
            shutil.copy2(tmp_path / f"server-{n}" / name, tmp_path / "img" / n / name)
    cleanup_pids.add(*pids)
    pycr("restore", "-D", tmp_path / "img" / "2", "-d")
    assert sums(w) == before
    counting(w, pids)


def test_a_wrong_secret_is_refused_on_both_sides(spawn_python, tmp_path, servers):
    w = start_tree(spawn_python)
    pids = w.pids()
    server = servers(tmp_path / "server", secret_file(tmp_path, "one secret\n"))
    other = secret_file(tmp_path, "another secret\n", name="other")
    failed = pycr(*dump_args(w, tmp_path / "img", server, other), expect=1)
    line = one_line_error(failed)
    assert f"page server 127.0.0.1:{server.port}: authentication failed" in line
    assert "are the secret files the same?" in line
    serr = server_line(server)
    assert "failed authentication: its proof does not match this secret" in serr
    assert serr.endswith("; still waiting for the dump")
    assert not (tmp_path / "server").exists() and files(tmp_path / "img") == []
    assert_untouched(w, pids)
    # The refused peer did not end the server: the dump with the right secret goes through.
    pycr(*dump_args(w, tmp_path / "img", server, tmp_path / "secret", "-R"))
    rc, _, _ = server.finish()
    assert rc == 0 and len(pages_files(tmp_path / "server")) == 3
    assert_untouched(w, pids)


def server_line(server, timeout=20):
    """The next line the running server writes to stderr (it must still run after it)."""
    ready, _, _ = select.select([server.proc.stderr], [], [], timeout)
    assert ready, "the server said nothing"
    line = server.proc.stderr.readline().strip()
    assert server.proc.poll() is None, f"the server exited: {line}"
    return line


def test_a_secret_file_others_can_read_is_refused(spawn_python, tmp_path):
    w = start_tree(spawn_python)
    loose = secret_file(tmp_path, mode=0o644)
    refused = pycr("page-server", "-D", tmp_path / "server", "--port", "0", "--secret-file", loose, expect=1)
    assert "accessible by group or others (mode 0644): chmod 600 it" in one_line_error(refused)
    refused = pycr("dump", "-t", w.pid, "-D", tmp_path / "img", "--page-server", "--address", "127.0.0.1",
                   "--port", "1", "--secret-file", loose, expect=1)
    assert "accessible by group or others (mode 0644)" in one_line_error(refused)
    empty = secret_file(tmp_path, "", name="empty")
    refused = pycr("page-server", "-D", tmp_path / "server", "--port", "0", "--secret-file", empty, expect=1)
    assert "the secret file is empty" in one_line_error(refused)
    assert files(tmp_path / "img") == []
    assert_untouched(w, w.pids())


def connect(server):
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def hello():
    return wire.Hello.build(dict(magic=wire.MAGIC, version=wire.PROTOCOL_VERSION,
                                 role=int(wire.Role.PAGE_CLIENT), reserved=bytes(3)))


@pytest.mark.parametrize("send, why", [
    (b"GET / HTTP/1.0\r\n\r\n" * 3, r"not a pycr peer \(its first bytes are b'GET / HT'\)"),
    (bytes(range(256)) * 8, r"not a pycr peer"),
    (None, r"sent nothing for 2 s where a frame header was due: dropped"),
    (b"", r"stopped sending in the middle of a frame header \(5 of 12 bytes\): dropped after 2 s"),
], ids=["http", "junk", "hello-then-silent", "hello-then-half-a-header"])
def test_a_foreign_or_silent_client_is_dropped_in_one_line(tmp_path, servers, send, why):
    server = servers(tmp_path / "server", secret_file(tmp_path), env={"PYCR_NET_TIMEOUT": "2"})
    began = time.monotonic()
    with connect(server) as sock:
        if send is None:
            sock.sendall(hello())
        elif send == b"":
            sock.sendall(hello() + bytes(5))
        else:
            sock.sendall(send)
        line = server_line(server)
    assert time.monotonic() - began < 15
    assert "Traceback" not in line
    assert line.startswith("pycr: page-server: refused peer 127.0.0.1:"), line
    assert re.search(why, line), line
    assert not (tmp_path / "server").exists()


def test_the_dump_refuses_a_server_that_is_not_a_page_server(spawn_python, tmp_path):
    """A listener that answers with junk (or nothing) is refused by the dump before it freezes anything."""
    w = start_tree(spawn_python)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "pycr", "dump", "-t", str(w.pid), "-D",
                                 str(tmp_path / "img"), "--page-server", "--address", "127.0.0.1", "--port",
                                 str(port), "--secret-file", str(secret_file(tmp_path))],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
            _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"page server 127.0.0.1:{port}: not a pycr peer (its first bytes are b'SSH-2.0-')" in err
    assert files(tmp_path / "img") == []
    assert_untouched(w, w.pids())


def test_a_page_server_killed_mid_dump_leaves_the_tree_running(spawn_python, tmp_path, servers):
    w = start_tree(spawn_python)
    pids = w.pids()
    before = sums(w)
    secret = secret_file(tmp_path)
    # The server stops once the first pages file has begun to arrive; it is then SIGKILLed.
    server = servers(tmp_path / "server", secret, env={"PYCR_STOP_AT_STEP": "2"})
    dump = subprocess.Popen([sys.executable, "-m", "pycr", *map(str, dump_args(w, tmp_path / "img", server,
                                                                             secret))],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.proc.stderr.readline()
        assert line.startswith("pycr: stopped at step 2 (receive pages-"), line
        server.proc.kill()
        _, err = dump.communicate(timeout=60)
    finally:
        if dump.poll() is None:
            dump.kill()
    assert dump.returncode == 1
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"pycr: page server 127.0.0.1:{server.port}: " in err
    assert "reset the connection" in err or "closed the connection" in err, err
    assert files(tmp_path / "img") == []
    assert_untouched(w, pids)
    assert sums(w) == before


def test_a_full_disk_on_the_server_fails_the_dump_in_one_line(spawn_python, tmp_path, servers, small_fs):
    w = start_tree(spawn_python)
    pids = w.pids()
    secret = secret_file(tmp_path)
    server = servers(small_fs / "server", secret)
    failed = pycr(*dump_args(w, tmp_path / "img", server, secret), expect=1)
    line = one_line_error(failed)
    assert f"page server 127.0.0.1:{server.port}: " in line and "No space left on device" in line, line
    rc, _, err = server.finish()
    assert rc == 1 and "No space left on device" in err
    assert [n for n in files(small_fs / "server") if not n.startswith(".")] == []
    assert files(tmp_path / "img") == []
    assert_untouched(w, pids)


def test_daemon_mode_reports_its_pid_and_status_fd_gets_a_nul(spawn_python, tmp_path, cleanup_pids):
    """--daemon returns once listening, naming the server's PID; --status-fd gets one NUL byte then."""
    w = start_tree(spawn_python)
    secret = secret_file(tmp_path)
    r, wfd = os.pipe()
    try:
        started = subprocess.run([sys.executable, "-m", "pycr", "page-server", "-D", str(tmp_path / "server"),
                                  "--port", "0", "--address", "127.0.0.1", "--secret-file", str(secret),
                                  "--daemon", "--status-fd", str(wfd)],
                                 stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
                                 pass_fds=(wfd,))
        os.close(wfd)
        wfd = -1
        assert started.returncode == 0, started.stderr
        m = re.match(r"pycr page-server: listening on 127\.0\.0\.1:(\d+) \(pid (\d+)\)$", started.stdout.strip())
        assert m, started.stdout
        port, daemon = int(m.group(1)), int(m.group(2))
        cleanup_pids.add(daemon)
        assert os.read(r, 16) == b"\0"
    finally:
        os.close(r)
        if wfd >= 0:
            os.close(wfd)
    server = type("S", (), {"port": port})()
    pycr(*dump_args(w, tmp_path / "img", server, secret, "-R"))
    assert procutil.wait_until(lambda: not procutil.exists(daemon) or procutil.is_zombie(daemon), 20)
    assert pages_files(tmp_path / "server") == sorted(f"pages-{p}.img" for p in w.pids())
    assert_untouched(w, w.pids())


STALL_TIMEOUT = 3.0


@pytest.mark.parametrize("leave_running", [True, False], ids=["-R", "kill"])
def test_a_stalled_page_server_holds_the_tree_frozen_no_longer_than_the_timeout(
        spawn_python, tmp_path, servers, leave_running):
    """The server is SIGSTOPped in the middle of a pages file, its socket buffer full: the dump gives up
    after PYCR_NET_TIMEOUT and thaws the tree at once (not after a second wait to say goodbye), then
    exits without waiting for the stopped server again."""
    w = start_tree(spawn_python)
    pids = w.pids()
    before = sums(w)
    secret = secret_file(tmp_path)
    server = servers(tmp_path / "server", secret, env={"PYCR_STOP_AT_STEP": "2"})
    extra = ("-R",) if leave_running else ()
    dump = subprocess.Popen([sys.executable, "-m", "pycr", *map(str, dump_args(w, tmp_path / "img", server,
                                                                             secret, *extra))],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYCR_NET_TIMEOUT=str(STALL_TIMEOUT)))
    try:
        line = server.proc.stderr.readline()
        assert line.startswith("pycr: stopped at step 2 (receive pages-"), line
        os.kill(server.proc.pid, signal.SIGSTOP)
        stalled = time.monotonic()
        assert all(procutil.tracer_pid(pid) == dump.pid for pid in pids), "the tree is not frozen mid-copy"
        while any(procutil.tracer_pid(pid) for pid in pids) and time.monotonic() - stalled < 4 * STALL_TIMEOUT:
            time.sleep(0.05)
        frozen_after_stall = time.monotonic() - stalled
        _, err = dump.communicate(timeout=4 * STALL_TIMEOUT)
        exited_after_stall = time.monotonic() - stalled
    finally:
        if dump.poll() is None:
            dump.kill()
        os.kill(server.proc.pid, signal.SIGCONT)
    # Within the timeout and a margin for a loaded machine; twice the timeout would be the old behaviour.
    assert frozen_after_stall < STALL_TIMEOUT + 1.5, f"frozen {frozen_after_stall:.2f} s after the stall"
    assert exited_after_stall < STALL_TIMEOUT + 3.0, f"exited {exited_after_stall:.2f} s after the stall"
    assert dump.returncode == 1
    assert err.count("\n") == 1 and "Traceback" not in err, err
    # Stalled while pycr sends (its socket buffer full) or, if the rest fitted in the buffers, while it
    # waits for the file's acknowledgement: either way the same deadline.
    assert re.search(rf"^pycr: page server 127\.0\.0\.1:{server.port}: (took no data|sent nothing) for "
                     rf"{STALL_TIMEOUT:g} s", err), err
    assert "the dump failed, the tree goes on as it was" in err, err
    assert files(tmp_path / "img") == []
    assert_untouched(w, pids)
    assert sums(w) == before


def test_a_port_in_use_is_refused_in_one_line_and_leaves_no_directory(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        refused = pycr("page-server", "-D", tmp_path / "server", "--address", "127.0.0.1", "--port", port,
                       "--secret-file", secret_file(tmp_path), expect=1)
    assert one_line_error(refused) == f"pycr: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert not (tmp_path / "server").exists()
