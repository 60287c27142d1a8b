"""Unix sockets come back connected, named, listening, with their queued data and options."""

import os
import signal
import socket
import stat

import procutil
from checkpointing import migrated
from pycrcmd import one_line_error, pycr

PRELUDE = """#!{python}
import os, signal, socket, struct, sys, time
st = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
where = os.path.dirname(sys.argv[1])
def report(line):
    os.write(st, (line + "\\n").encode())
want = []
signal.signal(signal.SIGUSR1, lambda *a: want.append(1))
def wait_signal():
    while not want:
        time.sleep(0.01)
    want.clear()
"""

PAIRS = PRELUDE + """
a, b = socket.socketpair()
a.sendall(b"0123456789" * 400)
b.sendall(b"to-a")
b.setsockopt(socket.SOL_SOCKET, 42, 4)                 # SO_PEEK_OFF: the program peeks from 4 on
a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 50000)
d1, d2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
for m in (b"one", b"", b"three"):
    d1.send(m)
q1, q2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
for m in (b"rec-1", b"record-2"):
    q1.send(m)
q1.shutdown(socket.SHUT_WR)
report("ready %d" % os.getpid())
wait_signal()
peeked = b.recv(4, socket.MSG_PEEK)
got = [peeked, b.recv(40000), a.recv(100), [d2.recv(100) for _ in range(3)],
       [q2.recv(100) for _ in range(3)], a.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)]
a.sendall(b"again"); d2.send(b"back"); q2.send(b"reply")
got += [b.recv(100), d1.recv(100), q1.recv(100)]
report("got %r" % (got,))
while True:
    time.sleep(0.1)
"""


EXPECTED = repr([b"4567", b"0123456789" * 400, b"to-a", [b"one", b"", b"three"],
                 [b"rec-1", b"record-2", b""], 100000, b"again", b"back", b"reply"])


def test_socketpairs_keep_their_data_boundaries_and_options(spawn_python, tmp_path, cleanup_pids):
    w = spawn_python("pairs", PAIRS)
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img")
    cleanup_pids.add(w.pid)
    pycr("restore", "-D", tmp_path / "img", "-d")
    got = w.signal_and_wait(signal.SIGUSR1, r"^got (.*)$").group(1)
    assert got == EXPECTED
    # SO_PEEK_OFF was stepped for the queues and put back: nothing is left to undo.
    assert "nothing of pycr's" in pycr("check", "-t", w.pid).stdout


SERVER = PRELUDE + """
path = os.path.join(where, "server.sock")
gone = os.path.join(where, "gone.sock")
abstract = b"\\0pycr-test-%d" % os.getpid()
listener = socket.socket(socket.AF_UNIX); listener.bind(path); listener.listen(4)
os.chmod(path, 0o640)
alisten = socket.socket(socket.AF_UNIX); alisten.bind(abstract); alisten.listen(1)
dserver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); dserver.bind(gone)
r, w = os.pipe()
child = os.fork()
if child == 0:
    c1 = socket.socket(socket.AF_UNIX); c1.connect(path)
    c2 = socket.socket(socket.AF_UNIX); c2.connect(path)
    c3 = socket.socket(socket.AF_UNIX); c3.connect(abstract)
    dc = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); dc.connect(gone)
    dc.send(b"dgram-before")
    os.write(w, b"x")
    wait_signal()
    for c, req in ((c1, b"req-1"), (c2, b"req-2"), (c3, b"req-a")):
        c.sendall(req)
    replies = [c.recv(100) for c in (c1, c2, c3)]
    dc.send(b"dgram-after")
    report("client got %r peer %r" % (replies, c1.getpeername()))
    while True:
        time.sleep(0.1)
os.read(r, 1)
conn1, _ = listener.accept()
conna, _ = alisten.accept()
os.unlink(gone)
report("child %d" % child)
report("ready %d" % os.getpid())
wait_signal()
listener.setblocking(False)
conn2, _ = listener.accept()
os.kill(child, signal.SIGUSR1)
served = []
for c in (conn1, conn2, conna):
    req = c.recv(100)
    served.append(req)
    c.sendall(b"reply-" + req)
datagrams = [dserver.recv(100), dserver.recv(100)]
report("server got %r %r names %r %r" % (served, datagrams, conn1.getsockname(), alisten.getsockname()))
while True:
    time.sleep(0.1)
"""


def test_listener_with_accepted_and_pending_connections(spawn_python, tmp_path, cleanup_pids):
    w = spawn_python("server", SERVER)
    child = int(w.last("child").split()[1])
    path = str(tmp_path / "server.sock")
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img")
    cleanup_pids.add(w.pid, child)
    assert stat.S_ISSOCK(os.stat(path).st_mode)          # the dead server's file is stale now
    os.chown(path, 1234, 1234)
    restored = pycr("restore", "-v", "-D", tmp_path / "img", "-d").stderr
    assert "removed the stale socket file" in restored
    st = os.stat(path)
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o640, 0)
    assert not os.path.exists(tmp_path / "gone.sock")
    start = w.mark()
    w.signal(signal.SIGUSR1)
    server = w.wait_for(r"^server got (.*)$", start=start).group(1)
    client = w.wait_for(r"^client got (.*)$", start=start).group(1)
    abstract = f"\\x00pycr-test-{w.pid}"
    assert server == (f"[b'req-1', b'req-2', b'req-a'] [b'dgram-before', b'dgram-after'] names "
                      f"'{path}' b'{abstract}'")
    assert client == f"[b'reply-req-1', b'reply-req-2', b'reply-req-a'] peer '{path}'"



def test_listener_with_accepted_and_pending_connections_through_migrate(spawn_python, tmp_path, cleanup_pids):
    """On one host the replica takes the source's own sockets: names, backlog and queues as they are."""
    w = spawn_python("server", SERVER)
    path = str(tmp_path / "server.sock")
    root, _ = migrated(w.pid, cleanup_pids, "--max-passes", 2, "--min-delta", "0")
    start = w.mark()
    w.signal(signal.SIGUSR1, pid=root)
    server = w.wait_for(r"^server got (.*)$", start=start, root=False).group(1)
    client = w.wait_for(r"^client got (.*)$", start=start, root=False).group(1)
    abstract = f"\\x00pycr-test-{w.pid}"
    assert server == (f"[b'req-1', b'req-2', b'req-a'] [b'dgram-before', b'dgram-after'] names "
                      f"'{path}' b'{abstract}'")
    assert client == f"[b'reply-req-1', b'reply-req-2', b'reply-req-a'] peer '{path}'"

UNCONNECTED = PRELUDE + """
plain = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
bound = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
bound.bind(os.path.join(where, "bound.sock"))
loose = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
report("ready %d" % os.getpid())
wait_signal()
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(os.path.join(where, "late.sock"))
server.listen()
plain.connect(os.path.join(where, "late.sock"))
conn, _ = server.accept()
plain.sendall(b"late hello")
bound.listen()
report("got %r bound %r" % (conn.recv(100), bound.getsockname().rpartition("/")[2]))
while True:
    time.sleep(0.1)
"""


def test_sockets_never_connected_come_back_usable(spawn_python, tmp_path, cleanup_pids):
    """A socket made but not connected (bound or not) is restored and can still connect or listen."""
    w = spawn_python("unconnected", UNCONNECTED)
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img")
    cleanup_pids.add(w.pid)
    pycr("restore", "-D", tmp_path / "img", "-d")
    got = w.signal_and_wait(signal.SIGUSR1, r"^got (.*)$").group(1)
    assert got == "b'late hello' bound 'bound.sock'"

CLIENT = PRELUDE + """
s = socket.socket(socket.AF_UNIX)
s.connect(b"\\0" + open(os.path.join(where, "addr")).read().encode())
report("fd %d" % s.fileno())
report("ready %d" % os.getpid())
n = 0
while not want:
    n += 1
    report("count %d" % n)
    time.sleep(0.01)
s.sendall(b"hello-after")
report("sent")
while True:
    time.sleep(0.1)
"""


def test_peer_outside_the_tree(spawn_python, tmp_path, cleanup_pids):
    name = f"pycr-outside-{os.getpid()}"
    (tmp_path / "addr").write_text(name)
    outside = socket.socket(socket.AF_UNIX)
    outside.bind(b"\0" + name.encode())
    outside.listen(4)
    with outside:
        w = spawn_python("client", CLIENT)
        fd = int(w.lines()[0].split()[1])
        first, _ = outside.accept()
        w.wait_for(r"^count 3$")
        line = one_line_error(pycr("dump", "-t", w.pid, "-D", tmp_path / "img", expect=1))
        assert line == f"pycr: pid {w.pid} fd {fd}: unix socket connected to @{name} outside the tree"
        procutil.assert_running_untraced(w.pid)
        n = int(w.last("count").split()[1])
        w.wait_for(rf"^count {n + 3}$")
        assert not os.path.exists(tmp_path / "img")
        # With --ext-unix-sk the restored socket connects to the same name again.
        pycr("dump", "-t", w.pid, "-D", tmp_path / "img", "--ext-unix-sk")
        cleanup_pids.add(w.pid)
        first.close()
        restored = pycr("restore", "-v", "-D", tmp_path / "img", "-d").stderr
        assert f"connected again to @{name} outside the tree" in restored
        outside.settimeout(10)
        again, _ = outside.accept()
        w.signal_and_wait(signal.SIGUSR1, r"^sent$")
        again.settimeout(10)
        assert again.recv(100) == b"hello-after"
        again.close()


RIGHTS = PRELUDE + """
a, b = socket.socketpair()
r, w = os.pipe()
os.write(w, b"through the fd")
a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", r))])
os.close(r)
report("fd %d" % b.fileno())
report("ready %d" % os.getpid())
wait_signal()
msg, anc, flags, addr = b.recvmsg(10, socket.CMSG_SPACE(4))
fd = struct.unpack("i", anc[0][2])[0]
report("got %r %r" % (msg, os.read(fd, 100)))
while True:
    time.sleep(0.1)
"""


def test_fds_in_flight_are_refused(spawn_python, tmp_path):
    w = spawn_python("rights", RIGHTS)
    fd = int(w.lines()[0].split()[1])
    line = one_line_error(pycr("dump", "-t", w.pid, "-D", tmp_path / "img", expect=1))
    assert line == (f"pycr: pid {w.pid} fd {fd}: unix socket has file descriptors in flight (SCM_RIGHTS) "
                    "in its queue")
    procutil.assert_running_untraced(w.pid)
    # The peek took nothing: the message and its fd are still there for the program.
    assert w.signal_and_wait(signal.SIGUSR1, r"^got (.*)$").group(1) == "b'x' b'through the fd'"


# A zero-length datagram once peeked through SO_PEEK_OFF is skipped by every later such peek
# (the kernel marks it peeked): a chain's earlier passes hide it from the final dump. Not here.
CHAIN_PAIRS = PAIRS.replace('(b"one", b"", b"three")', '(b"one", b"two", b"three")')
CHAIN_EXPECTED = EXPECTED.replace("b'one', b'', b'three'", "b'one', b'two', b'three'")


def test_socketpairs_through_a_pre_dump_chain(spawn_python, tmp_path, cleanup_pids):
    w = spawn_python("pairs", CHAIN_PAIRS)
    pycr("pre-dump", "-t", w.pid, "-D", tmp_path / "d1")
    pycr("dump", "-t", w.pid, "-D", tmp_path / "d2", "--prev-images-dir", "../d1")
    cleanup_pids.add(w.pid)
    pycr("restore", "-D", tmp_path / "d2", "-d")
    got = w.signal_and_wait(signal.SIGUSR1, r"^got (.*)$").group(1)
    assert got == CHAIN_EXPECTED


def test_socketpairs_through_migrate(spawn_python, tmp_path, cleanup_pids):
    w = spawn_python("pairs", CHAIN_PAIRS)
    root, _ = migrated(w.pid, cleanup_pids, "--max-passes", 2, "--min-delta", "0", "--work-dir", tmp_path / "work")
    start = w.mark()
    w.signal(signal.SIGUSR1, pid=root)
    got = w.wait_for(r"^got (.*)$", start=start, root=False).group(1)
    assert got == CHAIN_EXPECTED


PEEKER = PRELUDE + """
d1, d2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
d1.send(b"first"); d1.send(b"second")
report("fd %d" % d2.fileno())
report("ready %d" % os.getpid())
wait_signal()
report("peek %r" % d2.recv(100, socket.MSG_PEEK))
while True:
    time.sleep(0.1)
"""


def test_peek_offset_left_by_a_killed_pycr_is_found_and_put_back(spawn_python):
    from pycr.collect import skqueue, unixdiag
    from pycr.native import core
    w = spawn_python("peeker", PEEKER)
    fd = int(w.lines()[0].split()[1])
    # What a pycr SIGKILLed while stepping through the queue leaves: the journal entry
    # written before SO_PEEK_OFF was changed, and the socket's offset past "first".
    with socket.socket(fileno=core.dup_from(w.pid, fd)) as sock:
        ino = os.fstat(sock.fileno()).st_ino
        skqueue._record(ino, unixdiag.all_unix_sockets()[ino].cookie, -1)
        skqueue.set_peek_off(sock, 5)
    found = pycr("check", "-t", w.pid, expect=3).stdout
    assert f"pid {w.pid} fd {fd}: unix socket's SO_PEEK_OFF changed by pycr (it was -1)" in found
    assert f"pid {w.pid} fd {fd}" in pycr("cleanup", "-t", w.pid).stdout
    assert "nothing of pycr's" in pycr("check", "-t", w.pid).stdout
    procutil.assert_running_untraced(w.pid)
    assert w.signal_and_wait(signal.SIGUSR1, r"^peek (.*)$").group(1) == "b'first'"


def test_a_corrupt_unixsk_image_is_refused_before_anything_runs(spawn_python, tmp_path, cleanup_pids):
    import json
    w = spawn_python("pairs", PAIRS)
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img")
    cleanup_pids.add(w.pid)
    image = tmp_path / "img" / "unixsk.img"
    body = json.loads(pycr("show", image, "--json").stdout)
    body["body"]["sockets"][0]["peer"] = 1          # an inode the image does not have
    (tmp_path / "bad.json").write_text(json.dumps(body))
    pycr("encode", "-i", tmp_path / "bad.json", "-o", image)
    from pycr import manifest
    manifest.reseal(tmp_path / "img")             # checksums pass: only the image's own checks stand
    line = one_line_error(pycr("restore", "-D", tmp_path / "img", "-d", expect=1))
    assert line.startswith(f"pycr: {image}: corrupt: socket ") and "names a socket the image does not have" in line
    assert not procutil.exists(w.pid)
