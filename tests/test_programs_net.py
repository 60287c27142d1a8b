"""Everyday programs moved to another host (`pycr migrate --to`, tests/netns.py), checked by their clients.

Moved in every mode (pre-copy, post-copy, hybrid), since each mode restores
by another path (pre-dump passes; one lazy set whose pages fault in; both):
redis-server listening on 0.0.0.0 (data written before is read back by a new
client at the destination's address, which also writes), python3 -m
http.server listening on :: (a new client fetches a file from the
destination), the asyncio script of test_programs (an epoll set, a socketpair
woken by a signal: it counts on and answers SIGUSR1 over there) and a tmux
server (ptys, its unix socket: `list-sessions` and a new window's
`capture-pane` answer, the pane's loop goes on). Each program is small (a few
MiB) and each migration takes about a second: the file takes about 35 s.

What cannot follow a tree is refused in one line before it is frozen for
long, and the source goes on untouched: a listener bound to the source's own
address (refused at the first set on the destination; that set is a pre-dump
in pre-copy and hybrid alike, so pre-copy and post-copy are run), and an
established connection (--tcp-established) whose address stays on the source.
When that address moves to the destination too, the connection follows (one
mode: TCP repair is the same in all three). A loopback connection to a
process outside the tree is refused by the source itself.

Nothing is left behind: the source tree is gone (its port refuses), the
destination's work directory is empty, and once the test kills the replica by
PID the destination has no process left.
"""

import os
import random
import signal
import subprocess
import sys

import pytest

import procutil
from netns import two_hosts  # noqa: F401 (fixture)
from programs import http_site, need, start_program
from test_migrate_net import Serve, assert_destination_empty, assert_untouched, secret
from test_programs import ASYNCIO_SCRIPT, assert_tmux_session_goes_on, http_get, redis, start_tmux

MODES = ["pre-copy", "post-copy", "hybrid"]


class Migration:
    """`pycr migrate -t pid --to` a fresh `pycr serve --once` on the destination."""

    def __init__(self, hosts, tmp_path, pid, mode, *options):
        key = secret(tmp_path)
        self.hosts, self.pid = hosts, pid
        self.serve = Serve(hosts, tmp_path, key)
        m = hosts.source(hosts.pycr("migrate", "-t", pid, "--to", self.serve.address, "--secret-file", key,
                                    "--mode", mode, "--max-passes", 3, *options),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out, self.err = m.communicate(timeout=60)
        self.status = m.returncode

    def succeeded(self):
        assert self.status == 0, self.out + self.err
        status, _, serve_err = self.serve.result()
        assert status == 0, serve_err
        assert procutil.wait_gone([self.pid]) == [], "the source is still there"
        assert os.listdir(self.serve.work) == []
        return self

    def refused(self, *words):
        """One line on stderr, naming words; the destination gave up and holds nothing."""
        assert self.status == 1, self.out + self.err
        line = self.err.strip()
        assert len(line.splitlines()) == 1 and all(w in line for w in words), self.err
        assert self.serve.result()[0] == 1
        assert_destination_empty(self.serve)
        return line

    def replica_of(self, pid):
        """Host PID of the replica of the source's process pid (the last PID of its NSpid)."""
        for real in self.serve.replica():
            if int(procutil.status(real)["NSpid"].split()[-1]) == pid:
                return real
        raise AssertionError(f"no replica of pid {pid}: {self.serve.replica()}")

    def end(self):
        """Kill the replica by PID: the destination is left empty."""
        for pid in reversed(self.serve.replica()):
            procutil.kill(pid, signal.SIGKILL)
        assert_destination_empty(self.serve)


def any_port():
    """A port for a server: both namespaces are new, nothing else listens there."""
    return random.randrange(20000, 60000)


def refuses(hosts, ns, addr, port):
    """Nothing listens at addr:port as seen from namespace ns any more."""
    try:
        hosts.connect(ns, addr, port, timeout=0.2).close()
    except ConnectionRefusedError:
        return True
    return False


# ---------------------------------------------------------------- programs that move

def start_redis(hosts, spawn, tmp_path, bind):
    server = need("redis-server", "redis-server")
    p = any_port()
    w = start_program(spawn, tmp_path, hosts.in_source([
        server, "--port", p, "--bind", bind, "--protected-mode", "no", "--save", "", "--appendonly", "no",
        "--dir", tmp_path, "--daemonize", "no"]), name="redis-server")
    return w, p


def fill(sock, value):
    assert redis(sock, "SET", "blob", value) == b"OK"
    for i in range(100):
        redis(sock, "RPUSH", "list", i)
    assert redis(sock, "INCR", "counter") == 1


@pytest.mark.parametrize("mode", MODES)
def test_redis_serves_its_data_from_the_destination(two_hosts, spawn, tmp_path, mode):
    w, p = start_redis(two_hosts, spawn, tmp_path, "0.0.0.0")
    value = os.urandom(1 << 16)
    with two_hosts.connect(two_hosts.src_ns, two_hosts.src_addr, p) as c:
        fill(c, value)
        assert redis(c, "QUIT") == b"OK" and c.recv(1) == b""     # redis closed its end: no connection left
    moved = Migration(two_hosts, tmp_path, w.pid, mode).succeeded()
    with two_hosts.connect(two_hosts.dst_ns, two_hosts.dst_addr, p) as c:
        assert redis(c, "GET", "blob") == value
        assert redis(c, "LLEN", "list") == 100
        assert redis(c, "INCR", "counter") == 2
        assert redis(c, "SET", "after", "moved") == b"OK"
    with two_hosts.connect(two_hosts.dst_ns, "127.0.0.1", p) as c:
        assert redis(c, "GET", "after") == b"moved"
    assert refuses(two_hosts, two_hosts.src_ns, two_hosts.src_addr, p)
    moved.end()


@pytest.mark.parametrize("mode", MODES)
def test_asyncio_program_counts_on_at_the_destination(two_hosts, spawn, tmp_path, mode):
    script = tmp_path / "eventloop.py"
    script.write_text(ASYNCIO_SCRIPT.format(python=sys.executable))
    status = tmp_path / "eventloop.status"
    w = start_program(spawn, tmp_path, two_hosts.in_source([sys.executable, script, status]), name="eventloop")
    w.status_path = str(status)         # its reports, read by w.wait_for
    w.wait_for(r"^count 5$")
    moved = Migration(two_hosts, tmp_path, w.pid, mode).succeeded()
    n = int(w.last("count").split()[1])
    w.wait_for(rf"^count {n + 5}$", root=False)
    start = w.mark()
    procutil.kill(moved.replica_of(w.pid), signal.SIGUSR1)     # through the loop's wakeup fd (the socketpair)
    w.wait_for(r"^usr1 at \d+$", start=start, root=False)
    moved.end()


@pytest.mark.parametrize("mode", MODES)
def test_http_server_serves_files_from_the_destination(two_hosts, spawn, tmp_path, mode):
    site = http_site(tmp_path, b"hello from the other host\n")
    p = any_port()
    w = start_program(spawn, tmp_path, two_hosts.in_source([
        sys.executable, "-m", "http.server", "--protocol", "HTTP/1.1", "--bind", "::", "--directory", site, p]),
        name="http.server")
    with two_hosts.connect(two_hosts.src_ns, two_hosts.src_addr, p) as c:
        assert http_get(c, "/hello.txt")[0] == 200
    # http.server closes a keep-alive connection only when the client does: wait for its end to go
    assert procutil.wait_until(lambda: sum(link.startswith("socket:") for link in procutil.fds(w.pid).values())
                               == 1), procutil.fds(w.pid)
    moved = Migration(two_hosts, tmp_path, w.pid, mode).succeeded()
    with two_hosts.connect(two_hosts.dst_ns, two_hosts.dst_addr, p) as c:
        assert http_get(c, "/hello.txt") == (200, (site / "hello.txt").read_bytes())
        assert http_get(c, "/missing")[0] == 404
    assert refuses(two_hosts, two_hosts.src_ns, two_hosts.src_addr, p)
    moved.end()


@pytest.mark.parametrize("mode", MODES)
def test_tmux_session_goes_on_at_the_destination(two_hosts, tmp_path, cleanup_pids, mode):
    need("tmux", "tmux")
    sock, tick = tmp_path / "tmux.sock", tmp_path / "ticks"
    server = start_tmux(sock, tick, cleanup_pids, prefix=two_hosts.in_source([]))
    moved = Migration(two_hosts, tmp_path, server, mode).succeeded()
    # the socket file is on a filesystem both "hosts" share: the source is gone, the replica answers
    assert_tmux_session_goes_on(sock, tick)
    moved.end()


# ---------------------------------------------------------------- what cannot follow

@pytest.mark.parametrize("mode", ["pre-copy", "post-copy"])
def test_a_listener_bound_to_the_source_address_is_refused(two_hosts, spawn, tmp_path, mode):
    w, p = start_redis(two_hosts, spawn, tmp_path, two_hosts.src_addr)
    with two_hosts.connect(two_hosts.src_ns, two_hosts.src_addr, p) as c:
        fill(c, b"stays")
        assert redis(c, "QUIT") == b"OK" and c.recv(1) == b""
    failed = Migration(two_hosts, tmp_path, w.pid, mode)
    failed.refused(f"listening TCP socket {two_hosts.src_addr}:{p}", "not on this host")
    assert "pass " not in failed.out, "refused at the first set"
    assert_untouched([w.pid])
    with two_hosts.connect(two_hosts.src_ns, two_hosts.src_addr, p) as c:
        assert redis(c, "GET", "blob") == b"stays"


def test_an_established_connection_without_its_address_is_refused(two_hosts, spawn, tmp_path):
    w, p = start_redis(two_hosts, spawn, tmp_path, "0.0.0.0")
    with two_hosts.connect(two_hosts.dst_ns, two_hosts.src_addr, p) as c:    # a client on another host
        fill(c, b"stays")
        failed = Migration(two_hosts, tmp_path, w.pid, "pre-copy", "--tcp-established")
        failed.refused("established TCP connection", f"address {two_hosts.src_addr} is not on this host")
        assert_untouched([w.pid])
        assert redis(c, "GET", "blob") == b"stays"            # the same connection, unlocked
        assert redis(c, "INCR", "counter") == 2


def test_an_established_connection_follows_its_address(two_hosts, spawn, tmp_path):
    """The server's address moves with it: the destination has it at the first set, the source hands it
    over once the tree is gone; the client keeps its connection."""
    two_hosts.share_service_address()
    w, p = start_redis(two_hosts, spawn, tmp_path, two_hosts.service_addr)
    with two_hosts.connect(two_hosts.src_ns, two_hosts.service_addr, p, source=two_hosts.src_addr) as c:
        fill(c, b"follows")
        local = c.getsockname()
        moved = Migration(two_hosts, tmp_path, w.pid, "pre-copy", "--tcp-established").succeeded()
        two_hosts.move_service_address()
        assert redis(c, "GET", "blob") == b"follows"
        assert redis(c, "INCR", "counter") == 2
        assert c.getsockname() == local
    moved.end()


def test_a_loopback_connection_to_a_process_outside_is_refused(two_hosts, spawn, tmp_path):
    w, p = start_redis(two_hosts, spawn, tmp_path, "127.0.0.1")
    with two_hosts.connect(two_hosts.src_ns, "127.0.0.1", p) as c:
        fill(c, b"stays")
        failed = Migration(two_hosts, tmp_path, w.pid, "post-copy", "--tcp-established")
        line = failed.refused(f"pid {w.pid} fd ", f"127.0.0.1:{p} <-> 127.0.0.1:{c.getsockname()[1]}",
                              "outside the tree", "another host")
        assert "destination" not in line                       # the source refused it itself
        assert_untouched([w.pid])
        assert redis(c, "INCR", "counter") == 2
