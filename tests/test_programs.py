"""Everyday programs, unmodified, checkpointed and brought back; their own clients show they work.

Each goes through `pycr dump` + `pycr restore` and through `pycr migrate`. A
program pycr cannot install is skipped with one line saying why.
"""

import os
import signal
import socket
import subprocess
import time

import pytest

import procutil
from programs import checkpoint, connect, free_port, http_site, need, start_program

HOW = ["restore", "migrate"]

ASYNCIO_SCRIPT = """#!{python}
import asyncio, os, signal, sys
st = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
def report(line):
    os.write(st, (line + "\\n").encode())

async def main():
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, lambda: report("usr1 at %d" % n))
    report("ready %d" % os.getpid())
    global n
    n = 0
    while True:
        n += 1
        report("count %d" % n)
        await asyncio.sleep(0.02)
n = 0
asyncio.run(main())
"""


@pytest.mark.parametrize("how", HOW)
def test_asyncio_program_keeps_counting(spawn_python, tmp_path, cleanup_pids, how):
    """An event loop: an epoll set, a self-pipe socketpair woken by a signal, a timer."""
    w = spawn_python("eventloop", ASYNCIO_SCRIPT)     # not asyncio.py: it would shadow the module
    w.wait_for(r"^count 5$")
    pid = checkpoint(how, w.pid, tmp_path, cleanup_pids)
    n = int(w.last("count").split()[1])
    w.wait_for(rf"^count {n + 5}$", root=False)
    start = w.mark()
    procutil.kill(pid, signal.SIGUSR1)            # through the loop's wakeup fd (the socketpair)
    w.wait_for(r"^usr1 at \d+$", start=start, root=False)


def http_get(sock, path):
    """One HTTP/1.1 request on an open connection; (status, body). The connection stays open."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, "the server closed the connection"
        head += chunk
    head, _, body = head.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    length = int(next(line.split(":")[1] for line in lines if line.lower().startswith("content-length:")))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection mid-body"
        body += chunk
    return int(lines[0].split()[1]), body


@pytest.mark.parametrize("how", HOW)
def test_http_server_keeps_a_keepalive_connection(spawn, tmp_path, cleanup_pids, how):
    """python3 -m http.server; a client outside the tree fetches again on the same connection."""
    import sys
    site = http_site(tmp_path, b"hello from before the checkpoint\n")
    port = free_port()
    w = start_program(spawn, tmp_path, [sys.executable, "-m", "http.server", "--protocol", "HTTP/1.1",
                                        "--bind", "127.0.0.1", "--directory", site, port], name="http.server")
    with connect(port) as client:
        assert http_get(client, "/hello.txt") == (200, (site / "hello.txt").read_bytes())
        local = client.getsockname()
        checkpoint(how, w.pid, tmp_path, cleanup_pids, "--tcp-established")
        (site / "hello.txt").write_bytes(b"and after it\n")
        assert http_get(client, "/hello.txt") == (200, b"and after it\n")
        assert client.getsockname() == local
    with connect(port) as other:                     # the listener accepts new clients too
        assert http_get(other, "/hello.txt")[0] == 200


def redis(sock, *args):
    """One command in RESP; the reply as bytes, int or None (no client library needed)."""
    out = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in map(_bytes, args))
    sock.sendall(out)
    reader = sock.makefile("rb")
    line = reader.readline()
    kind, rest = line[:1], line[1:-2]
    if kind in (b"+", b"-"):
        return rest if kind == b"+" else AssertionError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else reader.read(n + 2)[:-2]
    raise AssertionError(f"unexpected reply {line!r}")


def _bytes(value):
    return value if isinstance(value, bytes) else str(value).encode()


@pytest.mark.parametrize("how", HOW)
def test_redis_keeps_its_data_and_its_clients(spawn, tmp_path, cleanup_pids, how):
    server = need("redis-server", "redis-server")
    port = free_port()
    w = start_program(spawn, tmp_path, [server, "--port", port, "--bind", "127.0.0.1", "--save", "",
                                        "--appendonly", "no", "--dir", tmp_path, "--daemonize", "no"])
    a, b = connect(port), connect(port)
    try:
        value = os.urandom(1 << 16)
        assert redis(a, "SET", "blob", value) == b"OK"
        for i in range(1000):
            redis(b, "RPUSH", "list", i)
        assert redis(a, "INCR", "counter") == 1
        checkpoint(how, w.pid, tmp_path, cleanup_pids, "--tcp-established")
        assert redis(a, "GET", "blob") == value
        assert redis(b, "LLEN", "list") == 1000
        assert redis(b, "INCR", "counter") == 2
        assert redis(a, "INCR", "counter") == 3
    finally:
        a.close()
        b.close()


def memcached(sock, line, payload=None):
    """One text-protocol command; the reply's lines up to its terminator."""
    sock.sendall(line.encode() + b"\r\n" + (payload + b"\r\n" if payload is not None else b""))
    reply = b""
    while not reply.endswith((b"STORED\r\n", b"END\r\n", b"ERROR\r\n")) and not \
            (reply[:1].isdigit() and reply.endswith(b"\r\n")):
        chunk = sock.recv(65536)
        assert chunk, "memcached closed the connection"
        reply += chunk
    return reply


@pytest.mark.parametrize("how", HOW)
def test_memcached_keeps_its_items_and_its_clients(spawn, tmp_path, cleanup_pids, how):
    """memcached: worker threads, each with its own epoll set, eventfd and pipe."""
    server = need("memcached", "memcached")
    port = free_port()
    w = start_program(spawn, tmp_path, [server, "-u", "root", "-l", "127.0.0.1", "-p", port, "-t", 4, "-U", 0])
    a, b = connect(port), connect(port)
    try:
        value = os.urandom(1 << 15).hex().encode()
        assert memcached(a, f"set blob 0 0 {len(value)}", value) == b"STORED\r\n"
        assert memcached(b, "set n 0 0 1", b"7") == b"STORED\r\n"
        checkpoint(how, w.pid, tmp_path, cleanup_pids, "--tcp-established")
        assert memcached(a, "get blob") == b"VALUE blob 0 %d\r\n%s\r\nEND\r\n" % (len(value), value)
        assert memcached(b, "incr n 35") == b"42\r\n"
        with connect(port) as c:
            assert memcached(c, "get n") == b"VALUE n 0 2\r\n42\r\nEND\r\n"
    finally:
        a.close()
        b.close()

def tmux(sock_path, *args, check=True):
    return subprocess.run(["tmux", "-S", str(sock_path), *args], capture_output=True, text=True, timeout=20,
                          check=check, stdin=subprocess.DEVNULL)


def start_tmux(sock_path, tick, cleanup_pids, prefix=()):
    """A tmux server with session "work", whose pane's loop writes a growing count to tick -> its PID
    (registered for cleanup). prefix: what runs tmux (nsenter into another network namespace)."""
    subprocess.run([*prefix, "tmux", "-S", str(sock_path), "-f", "/dev/null", "new-session", "-d", "-s", "work",
                    "-x", "100", "-y", "30", f"sh -c 'n=0; while :; do n=$((n+1)); echo $n > {tick}; sleep 0.1; done'"],
                   capture_output=True, text=True, timeout=20, check=True, stdin=subprocess.DEVNULL)
    server = int(tmux(sock_path, "display-message", "-p", "#{pid}").stdout)
    cleanup_pids.add(server)
    assert procutil.wait_until(lambda: tick.exists() and tick.read_text().strip(), 10)
    return server


def _ticks(tick):
    """The pane loop's count, or None while the file is being rewritten."""
    text = tick.read_text().strip()
    return int(text) if text else None


def assert_tmux_session_goes_on(sock_path, tick):
    """The pane's loop counts on, the session is listed, and a new window runs a command."""
    seen = []          # the loop rewrites the file: a read may find it empty, between truncate and write
    assert procutil.wait_until(lambda: seen.append(_ticks(tick)) or seen[-1] is not None, 10), "no tick read"
    before = seen[-1]
    assert procutil.wait_until(lambda: (_ticks(tick) or 0) > before + 3, 10), "the pane's loop stopped"
    assert tmux(sock_path, "list-sessions", "-F", "#{session_name}").stdout.split() == ["work"]
    tmux(sock_path, "new-window", "-t", "work", "sh")
    tmux(sock_path, "send-keys", "-t", "work:1", "echo restored-$((6*7))", "Enter")
    assert procutil.wait_until(lambda: "restored-42" in tmux(sock_path, "capture-pane", "-p", "-t", "work:1").stdout,
                               10)


@pytest.mark.parametrize("how", HOW)
def test_tmux_server_keeps_its_session(tmp_path, cleanup_pids, how):
    need("tmux", "tmux")
    sock = tmp_path / "tmux.sock"
    tick = tmp_path / "ticks"
    server = start_tmux(sock, tick, cleanup_pids)
    new = checkpoint(how, server, tmp_path, cleanup_pids)
    cleanup_pids.add(new)
    assert_tmux_session_goes_on(sock, tick)
    tmux(sock, "kill-server", check=False)
