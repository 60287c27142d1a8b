"""TCP and UDP sockets (IPv4 and IPv6) come back: listeners accept, UDP talks, and an
established connection to a client outside the tree goes on (TCP repair), with
`pycr dump/restore` and with `pycr migrate`. Loopback only."""

import http.client
import os
import signal
import socket
import struct
import sys
import time

import pytest

import procutil
from pycrcmd import one_line_error, pycr, stopped_at_step
from pycr.migrate import migrate
from pycr.migrate.loop import Policy

TCP_INFO_STATE_ESTABLISHED = 1

LISTENER_SCRIPT = """#!{python}
import os, select, signal, socket, sys
st = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
def report(line):
    os.write(st, (line + "\\n").encode())
def listener(family, host):
    l = socket.socket(family, socket.SOCK_STREAM)
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    l.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 77)
    l.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    l.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 3)
    l.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 5)
    l.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 50000)
    if family == socket.AF_INET6:
        l.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    l.bind((host, 0))
    l.listen(9)
    return l
ls = [listener(socket.AF_INET, "127.0.0.1"), listener(socket.AF_INET6, "::1")]
report("ports %d %d" % (ls[0].getsockname()[1], ls[1].getsockname()[1]))
report("ready %d" % os.getpid())
served = 0
while True:
    ready, _, _ = select.select(ls, [], [])
    for l in ready:
        c, peer = l.accept()
        line = c.recv(100)
        served += 1
        opts = [l.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) != 0,
                l.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0,
                l.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                l.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0,
                l.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT),
                l.getsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN),
                l.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)]
        if l.family == socket.AF_INET6:
            opts.append(l.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
        c.sendall(("%d %s %s" % (served, line.decode().strip(), opts)).encode())
        c.close()
"""


def ask(family, port, text):
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    with socket.create_connection((host, port), timeout=10) as c:
        c.sendall(text.encode() + b"\n")
        return c.recv(1000).decode()


def test_listeners_v4_and_v6_accept_new_clients_after_restore(spawn_python, tmp_path, cleanup_pids):
    w = spawn_python("listeners", LISTENER_SCRIPT)
    p4, p6 = (int(x) for x in w.fields("ports")[0])
    before4 = ask(socket.AF_INET, p4, "a")
    assert before4.startswith("1 a [True, True, 77, True, 3, 5, ")
    bufsize = before4.split(", ")[-1].rstrip("]")
    dump_dir = tmp_path / "img"
    pycr("dump", "-t", w.pid, "-D", dump_dir)
    cleanup_pids.add(w.pid)
    shown = pycr("show", dump_dir / "inetsk.img", "--json").stdout
    assert '"backlog": 9' in shown
    pycr("restore", "-D", dump_dir, "-d")
    # The restored listeners accept new clients; the count and the options carried on.
    assert ask(socket.AF_INET, p4, "b") == f"2 b [True, True, 77, True, 3, 5, {bufsize}]"
    assert ask(socket.AF_INET6, p6, "c") == f"3 c [True, True, 77, True, 3, 5, {bufsize}, 1]"


UDP_SCRIPT = """#!{python}
import os, signal, socket, sys, time
st = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
def report(line):
    os.write(st, (line + "\\n").encode())
peer = int(sys.argv[2])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("127.0.0.1", 0))
u.connect(("127.0.0.1", peer))
go = []
signal.signal(signal.SIGUSR1, lambda *a: go.append(1))
report("port %d" % u.getsockname()[1])
report("ready %d" % os.getpid())
while not go:
    time.sleep(0.01)
while True:
    data = u.recv(100)
    u.send(b"echo:" + data)
    report("got " + data.decode())
"""


def test_udp_bound_and_connected_talks_after_restore_queued_datagrams_dropped(spawn, tmp_path, cleanup_pids):
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.settimeout(10)
    script = tmp_path / "udp.py"
    script.write_text(UDP_SCRIPT.format(python=sys.executable))
    script.chmod(0o755)
    try:
        w = spawn(str(script), client.getsockname()[1])
        port = int(w.fields("port")[0][0])
        client.sendto(b"early", ("127.0.0.1", port))      # queued: the program reads only after SIGUSR1
        dump_dir = tmp_path / "img"
        out = pycr("dump", "-v", "-t", w.pid, "-D", dump_dir)
        cleanup_pids.add(w.pid)
        assert "datagrams queued to read" in out.stderr + out.stdout
        pycr("restore", "-D", dump_dir, "-d")
        mark = w.mark()
        w.signal(signal.SIGUSR1)
        client.sendto(b"ping", ("127.0.0.1", port))
        data, sender = client.recvfrom(100)
        assert (data, sender) == (b"echo:ping", ("127.0.0.1", port))
        # The early datagram was not carried (formats/inetsk.md): the first one read is ping.
        assert w.wait_for(r"^got (\w+)$", start=mark).group(1) == "ping"
        # Still connected: a datagram from another port is not received.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
            other.sendto(b"stranger", ("127.0.0.1", port))
        client.sendto(b"again", ("127.0.0.1", port))
        assert client.recvfrom(100)[0] == b"echo:again"
    finally:
        client.close()


SERVER_SCRIPT = """#!{python}
import os, signal, socket, sys, time
st = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
def report(line):
    os.write(st, (line + "\\n").encode())
l = socket.socket(socket.AF_INET6 if sys.argv[2] == "6" else socket.AF_INET, socket.SOCK_STREAM)
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("::1" if sys.argv[2] == "6" else "127.0.0.1", 0))
l.listen(4)
go = []
signal.signal(signal.SIGUSR1, lambda *a: go.append(1))
report("port %d" % l.getsockname()[1])
report("ready %d" % os.getpid())
c, _ = l.accept()
report("fd %d" % c.fileno())
c.setblocking(False)
pattern = bytes(range(256)) * 256
sent = 0
try:
    while True:
        sent += c.send(pattern)
except BlockingIOError:
    pass
report("queued %d" % sent)
while not go:
    time.sleep(0.01)
c.setblocking(True)
f = c.makefile("rb")
while True:
    line = f.readline()
    if not line:
        report("eof")
        break
    c.sendall(b"reply:" + line)
"""


def read_exactly(sock, n):
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 16))
        assert chunk, "the peer closed the connection"
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def established_server(spawn, tmp_path, family):
    script = tmp_path / "server.py"
    script.write_text(SERVER_SCRIPT.format(python=sys.executable))
    script.chmod(0o755)
    w = spawn(str(script), family)
    port = int(w.fields("port")[0][0])
    client = socket.socket(socket.AF_INET6 if family == "6" else socket.AF_INET, socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)     # the server's sends pile up on its side
    client.settimeout(20)
    client.connect(("::1" if family == "6" else "127.0.0.1", port))
    queued = int(w.wait_for(r"^queued (\d+)$").group(1))
    client.sendall(b"first\n")              # waits in the server's receive queue
    return w, client, queued


def client_state(client):
    return client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


@pytest.mark.parametrize("family", ["4", "6"])
def test_established_connection_goes_on_with_queued_data_both_ways(spawn, tmp_path, cleanup_pids, family):
    w, client, queued = established_server(spawn, tmp_path, family)
    try:
        dump_dir = tmp_path / "img"
        pycr("dump", "-t", w.pid, "-D", dump_dir, "--tcp-established")
        cleanup_pids.add(w.pid)
        shown = pycr("show", dump_dir / "inetsk.img", "--json").stdout
        assert '"recv_data": "' + b"first\n".hex() + '"' in shown
        # Nothing reached the client: no FIN, no RST (a read would give b"" or fail).
        assert client_state(client) == TCP_INFO_STATE_ESTABLISHED
        pycr("restore", "-D", dump_dir, "-d")
        w.signal(signal.SIGUSR1)
        pattern = bytes(range(256)) * 256
        got = read_exactly(client, queued)
        assert got == (pattern * (queued // len(pattern) + 1))[:queued]
        assert read_exactly(client, len(b"reply:first\n")) == b"reply:first\n"
        client.sendall(b"second\n")
        assert read_exactly(client, len(b"reply:second\n")) == b"reply:second\n"
    finally:
        client.close()
    w.wait_for(r"^eof$")


def test_established_connection_is_refused_by_name_without_the_option(spawn, tmp_path):
    w, client, _queued = established_server(spawn, tmp_path, "4")
    try:
        proc = pycr("dump", "-t", w.pid, "-D", tmp_path / "img", expect=1)
        local = f"127.0.0.1:{int(w.fields('port')[0][0])}"
        peer = "127.0.0.1:%d" % client.getsockname()[1]
        fd = w.wait_for(r"^fd (\d+)$").group(1)
        assert one_line_error(proc) == (f"pycr: pid {w.pid} fd {fd}: established TCP connection {local} <-> {peer} "
                                        "(dump with --tcp-established)")
        assert w.alive()
        procutil.assert_running_untraced(w.pid)
        w.signal(signal.SIGUSR1)
        assert read_exactly(client, 3) == bytes(range(3))
    finally:
        client.close()


HTTP_SCRIPT = """#!{python}
import os, sys
os.write(os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), b"ready %d\\n" % os.getpid())
os.chdir({root!r})
os.execv(sys.executable, [sys.executable, "-m", "http.server", "--protocol", "HTTP/1.1",
                          "--bind", "127.0.0.1", "{port}"])
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_server(spawn, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "hello.txt").write_text("hello from http.server\n")
    port = free_port()
    script = tmp_path / "http.py"
    script.write_text(HTTP_SCRIPT.format(python=sys.executable, root=str(root), port=port))
    script.chmod(0o755)
    w = spawn(str(script))
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except ConnectionRefusedError:
            assert time.monotonic() < deadline, "http.server did not listen"
            time.sleep(0.05)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    assert fetch(conn) == b"hello from http.server\n"
    return w, conn, root


def fetch(conn, path="/hello.txt"):
    conn.request("GET", path)
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Connection", "keep-alive").lower() != "close"
    return resp.read()


def test_http_server_keep_alive_connection_survives_dump_and_restore(spawn, tmp_path, cleanup_pids):
    w, conn, root = http_server(spawn, tmp_path)
    try:
        sock, local = conn.sock, conn.sock.getsockname()
        dump_dir = tmp_path / "img"
        pycr("dump", "-t", w.pid, "-D", dump_dir, "--tcp-established")
        cleanup_pids.add(w.pid)
        pycr("restore", "-D", dump_dir, "-d")
        (root / "hello.txt").write_text("hello again\n")
        assert fetch(conn) == b"hello again\n"
        assert conn.sock is sock and sock.getsockname() == local      # the same connection, not a new one
        assert fetch(conn) == b"hello again\n"
    finally:
        conn.close()


def test_http_server_keep_alive_connection_survives_migrate(spawn, tmp_path, cleanup_pids):
    w, conn, root = http_server(spawn, tmp_path)
    try:
        sock, local = conn.sock, conn.sock.getsockname()
        res = migrate(w.pid, policy=Policy(max_passes=3, min_delta=0),
                      on_pass=lambda rep, replica: cleanup_pids.add(*replica.reals))
        assert not procutil.exists(w.pid) or procutil.state(w.pid) == "Z"
        (root / "hello.txt").write_text("hello from the replica\n")
        assert fetch(conn) == b"hello from the replica\n"
        assert conn.sock is sock and sock.getsockname() == local
        assert res.summary.root_real != w.pid
    finally:
        conn.close()


def test_a_connection_left_in_repair_mode_is_found_and_undone(spawn, tmp_path, cleanup_pids):
    """pycr killed after it read a connection (dump -R): it is left locked, not in repair mode
    (where recv fails with EPERM); repair mode left inside the short window of the read is found
    too; check -t lists both, cleanup -t takes them out, and the connection works again."""
    from pycr import tcp_repair
    from pycr.native import core
    w, client, queued = established_server(spawn, tmp_path, "4")
    try:
        killed_while_locked(w, tmp_path)
        listed = pycr("check", "-t", w.pid, expect=3)
        fd = w.wait_for(r"^fd (\d+)$").group(1)
        assert f"pid {w.pid} fd {fd}: TCP connection" in listed.stdout and "socket filter" in listed.stdout
        assert "repair mode" not in listed.stdout
        with socket.socket(fileno=core.dup_from(w.pid, int(fd))) as sock:     # as if killed mid-read
            tcp_repair.repair_on(sock)
        listed = pycr("check", "-t", w.pid, expect=3)
        assert "left in repair mode" in listed.stdout and "socket filter" in listed.stdout
        pycr("cleanup", "-t", w.pid)
        assert "repair mode" not in pycr("check", "-t", w.pid, expect=None).stdout
        w.signal(signal.SIGUSR1)
        pattern = bytes(range(256)) * 256
        assert read_exactly(client, queued) == (pattern * (queued // len(pattern) + 1))[:queued]
        assert read_exactly(client, len(b"reply:first\n")) == b"reply:first\n"
    finally:
        client.close()


def test_check_refuses_a_corrupt_or_handed_over_entry(tmp_path):
    """check() runs before any task exists: bad ports, options pycr never sets, repair records on a
    listener, and a migration's handover entry in a plain restore are refused naming the file."""
    from types import SimpleNamespace
    from test_formats import sample_inetsk as inetsk_body
    from pycr.errors import ImageError
    from pycr.formats.inetsk import Body
    from pycr.restore import inetsk
    path = str(tmp_path / "inetsk.img")
    rec = SimpleNamespace(file_id=5, fd=7)

    def parsed(change):
        body = inetsk_body()
        body["sockets"][2]["handover"] = False      # the sample's UDP entry is a migration's
        change(body["sockets"][1])
        return Body.parse(Body.build(body))

    inetsk.check(path, parsed(lambda s: None), [(100, rec)])
    bad = [lambda s: s["local"].update(port=70000),
           lambda s: s["options"].append(dict(level=1, name=16, value=b"\1\0\0\0")),    # SO_PASSCRED
           lambda s: s.update(state=10),                                                 # a listener with repair state
           lambda s: s["tcp"][0].update(unsent=99),
           lambda s: s.update(handover=True)]
    for change in bad:
        with pytest.raises(ImageError, match="inetsk.img"):
            inetsk.check(path, parsed(change), [(100, rec)])
    with pytest.raises(ImageError, match="pid 100 fd 8 has no socket entry"):
        inetsk.check(path, parsed(lambda s: None), [(100, SimpleNamespace(file_id=77, fd=8))])


def test_leave_running_takes_the_connection_out_of_repair_mode(spawn, tmp_path):
    w, client, queued = established_server(spawn, tmp_path, "4")
    try:
        out = pycr("dump", "-v", "-R", "-t", w.pid, "-D", tmp_path / "img", "--tcp-established")
        assert "pycr's filter detached" in out.stdout + out.stderr
        assert "repair mode" not in pycr("check", "-t", w.pid, expect=None).stdout
        w.signal(signal.SIGUSR1)
        pattern = bytes(range(256)) * 256
        assert read_exactly(client, queued) == (pattern * (queued // len(pattern) + 1))[:queued]
        assert read_exactly(client, len(b"reply:first\n")) == b"reply:first\n"
        client.sendall(b"more\n")
        assert read_exactly(client, len(b"reply:more\n")) == b"reply:more\n"
    finally:
        client.close()


# -- the lock against incoming data (pycr.tcp_lock): a client that keeps sending

ECHO_SCRIPT = """#!{python}
import os, select, socket, struct, sys
st = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
def report(line):
    os.write(st, (line + "\\n").encode())
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", 0))
l.listen(4)
report("port %d" % l.getsockname()[1])
report("ready %d" % os.getpid())
c, _ = l.accept()
if sys.argv[2:] == ["own-filter"]:        # accept every packet whole: the program's own filter
    code = struct.pack("=HBBI", 0x06, 0, 0, 0xFFFFFFFF)
    import ctypes
    buf = ctypes.create_string_buffer(code, len(code))
    c.setsockopt(socket.SOL_SOCKET, 26, struct.pack("=HxxxxxxQ", 1, ctypes.addressof(buf)))
report("fd %d" % c.fileno())
while True:
    select.select([c], [], [])      # not blocked in recv: see the test of a filter left by a killed pycr
    data = c.recv(65536)
    if not data:
        report("eof")
        break
    c.sendall(data)
"""

TCPI_TOTAL_RETRANS = 100        # offset of tcpi_total_retrans in struct tcp_info
BPF_LDB_ABS, BPF_JSET_K, BPF_RET = 0x30, 0x45, 0x06
TCP_FLAG_RST = 0x04


class StreamingClient:
    """A client outside the tree that writes numbered lines without waiting for answers
    (every 2 ms) and reads the echoes in another thread: the echoed stream must be the sent one."""

    def __init__(self, port):
        import threading
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sent, self.echoed, self.count = bytearray(), bytearray(), 0
        self.paused, self.stopping = threading.Event(), threading.Event()
        self.writer = threading.Thread(target=self._write, daemon=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.writer.start()
        self.reader.start()

    def _write(self):
        while not self.stopping.is_set():
            if not self.paused.is_set():
                line = b"%d\n" % self.count
                self.sock.sendall(line)
                self.sent += line
                self.count += 1
            time.sleep(0.002)
        self.sock.shutdown(socket.SHUT_WR)

    def _read(self):
        while True:
            data = self.sock.recv(1 << 16)
            if not data:
                return
            self.echoed += data

    def wait_lines(self, n, timeout=20):
        deadline = time.monotonic() + timeout
        start = self.count
        while self.count < start + n:
            assert time.monotonic() < deadline and self.writer.is_alive(), "the client could not send"
            time.sleep(0.01)

    def retransmissions(self):
        info = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCPI_TOTAL_RETRANS + 4)
        return struct.unpack_from("I", info, TCPI_TOTAL_RETRANS)[0]

    def ignore_resets(self, on):
        """While on, a RST reaching the client is dropped by its own socket filter."""
        if not on:
            self.sock.setsockopt(socket.SOL_SOCKET, 27, 0)          # SO_DETACH_FILTER
            return
        import ctypes
        prog = [(BPF_LDB_ABS, 0, 0, 13), (BPF_JSET_K, 0, 1, TCP_FLAG_RST), (BPF_RET, 0, 0, 0),
                (BPF_RET, 0, 0, 0xFFFFFFFF)]             # the TCP header's flags byte; RST: drop
        code = b"".join(struct.pack("=HBBI", *insn) for insn in prog)
        self._filter = ctypes.create_string_buffer(code, len(code))
        self.sock.setsockopt(socket.SOL_SOCKET, 26,                  # SO_ATTACH_FILTER
                             struct.pack("=HxxxxxxQ", len(prog), ctypes.addressof(self._filter)))

    def finish(self, timeout=30):
        """Stop sending, wait for every echo (the server closes after EOF) -> (sent, echoed)."""
        self.stopping.set()
        self.writer.join(timeout)
        self.reader.join(timeout)
        assert not self.reader.is_alive(), "the echoes stopped coming"
        return bytes(self.sent), bytes(self.echoed)

    def close(self):
        self.stopping.set()
        self.sock.close()


def echo_server(spawn, tmp_path, *args):
    script = tmp_path / "echo.py"
    script.write_text(ECHO_SCRIPT.format(python=sys.executable))
    script.chmod(0o755)
    w = spawn(str(script), *args)
    client = StreamingClient(int(w.fields("port")[0][0]))
    return w, client, int(w.wait_for(r"^fd (\d+)$").group(1))


def first_gap(sent, echoed):
    """Where the echoed numbered lines stop matching the sent ones, said readably."""
    a, b = sent.split(b"\n"), echoed.split(b"\n")
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"line {i}: sent {a[i:i + 3]}, echoed {b[i:i + 3]} ({len(a)} lines sent, {len(b)} echoed)"


def server_filter(pid, fd):
    from pycr import tcp_lock
    from pycr.native import core
    with socket.socket(fileno=core.dup_from(pid, fd)) as sock:
        return tcp_lock.filter_of(sock)


def test_a_client_that_keeps_sending_across_dump_leave_running_loses_nothing(spawn, tmp_path):
    """The connection is locked while it is read (what the client sends meanwhile is not
    acknowledged: it is sent again), and unlocked at the thaw: no gap, no duplicate."""
    w, client, fd = echo_server(spawn, tmp_path)
    try:
        client.wait_lines(50)
        before = client.retransmissions()
        out = pycr("dump", "-v", "-R", "-t", w.pid, "-D", tmp_path / "img", "--tcp-established")
        log = out.stdout + out.stderr
        assert "locked: a socket filter drops what the peer sends" in log and "filter detached" in log
        assert server_filter(w.pid, fd) == ()
        client.wait_lines(200)
        sent, echoed = client.finish()
        assert echoed == sent, first_gap(sent, echoed)
        # What the client sent while the lock was on was dropped unacknowledged, and sent again.
        assert client.retransmissions() > before
        w.wait_for(r"^eof$")
    finally:
        client.close()


def test_a_client_that_keeps_sending_across_dump_and_restore_loses_nothing(spawn, tmp_path, cleanup_pids):
    """The lines the client sent after the dump read the receive queue, until the kill, were
    not acknowledged: they are sent again and reach the restored server, so its stream has no
    gap. The client pauses between the kill and the restore; its retransmissions do not, and a
    segment reaching the host while no socket has the port gets a RST (formats/inetsk.md): the
    client's own filter drops those RSTs until the restore, as if they had been lost."""
    w, client, _fd = echo_server(spawn, tmp_path)
    try:
        client.wait_lines(50)
        client.ignore_resets(True)
        dump_dir = tmp_path / "img"
        pycr("dump", "-t", w.pid, "-D", dump_dir, "--tcp-established")
        client.paused.set()
        cleanup_pids.add(w.pid)
        pycr("restore", "-D", dump_dir, "-d")
        client.ignore_resets(False)
        client.paused.clear()
        client.wait_lines(200)
        sent, echoed = client.finish()
        assert echoed == sent, first_gap(sent, echoed)
        assert client.retransmissions() > 0
    finally:
        client.close()
    w.wait_for(r"^eof$")


def test_a_connection_with_a_filter_of_its_own_is_refused_and_keeps_it(spawn, tmp_path):
    w, client, fd = echo_server(spawn, tmp_path, "own-filter")
    try:
        client.wait_lines(20)
        proc = pycr("dump", "-t", w.pid, "-D", tmp_path / "img", "--tcp-established", expect=1)
        assert one_line_error(proc).startswith(f"pycr: pid {w.pid} fd {fd}: established TCP connection 127.0.0.1:")
        assert "has a socket filter of its own (1 classic BPF instructions)" in one_line_error(proc)
        procutil.assert_running_untraced(w.pid)
        assert server_filter(w.pid, fd) == ((BPF_RET, 0, 0, 0xFFFFFFFF),)
        client.wait_lines(20)
        sent, echoed = client.finish()
        assert echoed == sent, first_gap(sent, echoed)
    finally:
        client.close()


def killed_while_locked(w, tmp_path):
    """Run dump -R --tcp-established and SIGKILL pycr once it has written the first images."""
    with stopped_at_step("write pstree, files and pipes-data", "dump", "-t", w.pid, "-D", tmp_path / "img",
                         "-R", "--tcp-established") as (p, _):
        p.kill()
    assert procutil.wait_until(lambda: procutil.state(w.pid) != "t", timeout=10)


@pytest.mark.parametrize("remove_by", ["cleanup", "dump"])
def test_a_filter_left_by_a_killed_pycr_is_found_and_removed(spawn, tmp_path, remove_by):
    """pycr SIGKILLed with its filter on: the connection drops everything the client sends;
    check -t lists it, and cleanup -t (or the next dump) detaches it by its signature.
    The connection is not left in repair mode (where a recv() fails with EPERM): pycr leaves
    it as soon as the connection is read, and enters it again only just before a kill."""
    from pycr import tcp_lock
    w, client, fd = echo_server(spawn, tmp_path)
    try:
        client.wait_lines(20)
        client.paused.set()
        assert procutil.wait_until(lambda: len(client.echoed) == len(client.sent), timeout=10)
        killed_while_locked(w, tmp_path)
        assert server_filter(w.pid, fd) == tcp_lock.PROGRAM
        before = client.retransmissions()
        client.paused.clear()
        client.wait_lines(10)
        assert procutil.wait_until(lambda: client.retransmissions() > before, timeout=10)
        assert len(client.echoed) < len(client.sent)        # dropped unanswered while the filter is on
        listed = pycr("check", "-t", w.pid, expect=3).stdout
        assert f"pid {w.pid} fd {fd}: TCP connection 127.0.0.1:" in listed
        assert "locked by pycr's socket filter" in listed and "left in repair mode" not in listed
        if remove_by == "cleanup":
            out = pycr("cleanup", "-t", w.pid).stdout
            assert "locked by pycr's socket filter" in out
        else:
            pycr("dump", "-R", "-t", w.pid, "-D", tmp_path / "img2", "--tcp-established")
        assert "nothing of pycr's" in pycr("check", "-t", w.pid).stdout
        assert server_filter(w.pid, fd) == ()
        client.wait_lines(100)
        sent, echoed = client.finish()
        assert echoed == sent, first_gap(sent, echoed)
    finally:
        client.close()


def test_check_proves_tcp_repair_and_the_lock():
    import json
    doc = json.loads(pycr("check", "--json").stdout)
    found = {c["name"]: c for c in doc["checks"]}
    assert found["TCP repair"]["ok"], found["TCP repair"]["detail"]
    assert found["TCP lock (socket filter)"]["ok"], found["TCP lock (socket filter)"]["detail"]
    assert "not acknowledged" in found["TCP lock (socket filter)"]["detail"]
