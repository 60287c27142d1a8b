"""`pycr migrate --to` and `pycr serve` between two hosts (network namespaces, tests/netns.py).

The source tree and `pycr migrate --to` run in one namespace; `pycr serve`
runs in the other, in its own PID and mount namespaces. A migrated tree goes
on counting on the destination with memory that checks out (each process
prints a CRC-32 of its buffers, which the test computes independently) and
is gone from the source. Every failure before the commit point (a wrong
secret, the link cut during a pass, the destination killed) leaves the
source running as it was (untraced, no userfaultfd of pycr's) and nothing of
the replica on the destination.
"""

import fcntl
import os
import random
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib

import pytest

import procutil
from netns import two_hosts  # noqa: F401 (fixture)

UFFD_LINK = "anon_inode:[userfaultfd]"
PASS_LINE = re.compile(r"^pass (\d+) (pre-dump|dump): \+(\d+) -(\d+) tasks(?:, \d+ re-created)?, "
                       r"(\d+) pages, (\d+) bytes, ([0-9.]+) s .*, ([0-9.]+) MiB/s sent, dirty ", re.M)
FAST_FAIL = {"PYCR_NET_TIMEOUT": "3", "PYCR_NET_IDLE_TIMEOUT": "4", "PYCR_MIGRATE_DOUBT_TIMEOUT": "3"}

# The workload's memory, shared with the test that recomputes its checksums.
MEMORY = r'''
import zlib

PAGE = 4096

def fill(idx, mib):
    buf = bytearray(mib << 20)
    for p in range(len(buf) // PAGE):
        buf[p * PAGE:p * PAGE + 8] = (idx * 1000003 + p).to_bytes(8, "little")
    return buf

def touch(buf, step):
    """Write number `step` into one page (the steps walk all pages in a fixed order)."""
    p = (step * 7919) % (len(buf) // PAGE)
    buf[p * PAGE + 8:p * PAGE + 16] = step.to_bytes(8, "little")
'''

# A tree of nproc processes (argv: out file, nproc, MiB each, share of pages written per second),
# each with its buffer filled; what each then does follows.
TREE_START = MEMORY + r'''
import os, sys, threading, time

out, nproc, mib, per_s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
idx = 0
for i in range(1, nproc):
    if os.fork() == 0:
        idx = i
        break
buf = fill(idx, mib)
pages = len(buf) // PAGE
'''

WORKLOAD = TREE_START + r'''
step = 0
last = 0.0
while True:
    batch = int(pages * per_s * 0.05)
    for _ in range(batch):
        touch(buf, step)
        step += 1
    now = time.monotonic()
    if now - last >= 0.2:
        os.write(fd, f"w {idx} {os.getpid()} {step} {zlib.crc32(buf):08x}\n".encode())
        last = now
    time.sleep(0.05)
'''

_mem = {}
exec(MEMORY, _mem)


def expected_crc(idx, mib, steps):
    buf = _mem["fill"](idx, mib)
    for s in range(steps):
        _mem["touch"](buf, s)
    return f"{zlib.crc32(buf):08x}"


class Tree:
    """The workload in the source namespace: nproc processes of mib MiB, writing per_s of their pages per s."""

    def __init__(self, hosts, tmp_path, nproc, mib, per_s):
        self.out = tmp_path / "out.txt"
        self.out.touch()
        script = tmp_path / "workload.py"
        script.write_text(WORKLOAD)
        self.nproc, self.mib = nproc, mib
        self.proc = hosts.source([sys.executable, str(script), str(self.out), str(nproc), str(mib), str(per_s)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert procutil.wait_until(lambda: len(self.latest()) == nproc, timeout=20), self.out.read_text()
        self.pids = [self.proc.pid, *procutil.descendants(self.proc.pid)]
        # reaped once a migration kills it, as by a parent that waits: pycr waits for its PIDs to be free
        threading.Thread(target=self.proc.wait, daemon=True).start()

    def lines(self, start=0):
        return [line.split() for line in self.out.read_text().splitlines()[start:] if line.startswith("w ")]

    def mark(self):
        return len(self.out.read_text().splitlines())

    def latest(self, start=0):
        """idx -> (pid, step, crc) of each process's last line since line `start`."""
        return {int(f[1]): (int(f[2]), int(f[3]), f[4]) for f in self.lines(start)}

    def assert_counts_on(self, start=0, timeout=10):
        """Every process prints new lines after `start`, whose checksums are right."""
        assert procutil.wait_until(lambda: len(self.latest(start)) == self.nproc, timeout=timeout), \
            f"not every process went on: {self.latest(start)}"
        for idx, (pid, steps, crc) in self.latest(start).items():
            assert crc == expected_crc(idx, self.mib, steps), f"process {idx} (pid {pid}): memory differs"
        return self.latest(start)

    def assert_unharmed(self):
        """The source runs untraced, without pycr's userfaultfds, and goes on counting correctly."""
        assert_untouched(self.pids)
        self.assert_counts_on(self.mark())


def assert_untouched(pids):
    """Each process runs untraced and without pycr's userfaultfds (a migration that failed left it so)."""
    for pid in pids:
        procutil.assert_running_untraced(pid)
        assert UFFD_LINK not in procutil.fds(pid).values(), procutil.fds(pid)


def secret(tmp_path, name="secret", content=None):
    path = tmp_path / name
    path.write_bytes(content or os.urandom(32).hex().encode())
    path.chmod(0o600)
    return path


class Serve:
    """`pycr serve --once` (or, once=False, until SIGTERM) in the destination namespace."""

    def __init__(self, hosts, tmp_path, secret_path, *extra, env=None, once=True):
        self.port = random.randrange(20000, 60000)
        self.work = tmp_path / "dst-work"
        self.hosts = hosts
        self.proc = hosts.destination(hosts.pycr("serve", "--listen", f"{hosts.dst_addr}:{self.port}",
                                                 "--secret-file", secret_path, *(["--once"] if once else []),
                                                 "-W", self.work, *extra),
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert "listening on" in line, line + self.proc.stderr.read()
        self.address = f"{hosts.dst_addr}:{self.port}"

    def pid(self):
        """Host PID of the pycr serve process."""
        for pid in self.hosts.dest_processes(self.proc):
            if "serve" in (procutil._read(f"/proc/{pid}/cmdline") or b"").decode(errors="replace"):
                return pid
        return None

    def result(self, timeout=30):
        """(exit status, stdout lines, stderr) of pycr serve once it ended (the shell says `exit N`)."""
        err = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if line.startswith("exit "):
                out = []
                return int(line.split()[1]), out, "".join(err)
            err.append(line)
        raise AssertionError("pycr serve did not end: " + "".join(err))

    def replica(self):
        return [pid for pid in self.hosts.dest_processes(self.proc) if pid != self.pid()]


def migrate(hosts, tree, address, secret_path, *extra, env=None):
    return hosts.source(hosts.pycr("migrate", "-t", tree.proc.pid, "--to", address, "--secret-file", secret_path,
                                   *extra), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def held_at_ready(two_hosts, tree, serve, key, *args):
    """`pycr migrate` held at its step "READY received" (the replica ready, the source frozen) -> Popen."""
    m = migrate(two_hosts, tree, serve.address, key, *args, env=dict(FAST_FAIL, PYCR_STOP_AT_STEP="READY received"))
    line = m.stderr.readline()
    assert line.startswith("pycr: stopped at step") and "READY received" in line, line + m.stderr.read()
    return m


def stop_held(m, tree, serve):
    """SIGTERM to a migration held at the commit point: it fails, the source runs on unharmed, and
    serve leaves the replica stopped -> serve's stderr."""
    m.send_signal(signal.SIGTERM)
    out, err = m.communicate(timeout=30)
    assert m.returncode != 0, out + err
    tree.assert_unharmed()
    status, _, serve_err = serve.result()
    assert status == 0 and "left stopped" in serve_err, serve_err
    return serve_err


def assert_destination_empty(serve):
    assert procutil.wait_until(lambda: serve.hosts.dest_processes(serve.proc) == [], timeout=10), \
        [(pid, procutil.state(pid)) for pid in serve.hosts.dest_processes(serve.proc)]
    assert not serve.work.exists() or os.listdir(serve.work) == []


# ---------------------------------------------------------------- migrations

def test_forking_tree_moves_to_the_other_host(two_hosts, tmp_path):
    key = secret(tmp_path)
    serve = Serve(two_hosts, tmp_path, key)
    tree = Tree(two_hosts, tmp_path, nproc=4, mib=8, per_s=0)
    before = tree.latest()
    m = migrate(two_hosts, tree, serve.address, key)
    out, err = m.communicate(timeout=60)
    assert m.returncode == 0, out + err
    passes = PASS_LINE.findall(out)
    assert passes and passes[-1][1] == "dump" and passes[0][2] == "4", out
    assert int(passes[0][5]) > 4 * 8 << 20, "the first pass carries every page"
    assert re.search(r"^downtime [0-9.]+ s .* bytes sent in \d+ pass(es)?", out, re.M), out
    # the source is gone ...
    assert tree.proc.wait(timeout=10) == -signal.SIGKILL
    procutil.wait_gone(tree.pids[1:])
    # ... and goes on over there, same PIDs inside its namespace, memory intact
    status, _, serve_err = serve.result()
    assert status == 0, serve_err
    after = tree.assert_counts_on(tree.mark())
    for idx, (pid, steps, _) in after.items():
        assert pid == before[idx][0]
    assert len(serve.replica()) >= 4       # the replica's namespace init and the four processes


def test_a_tree_writing_memory_converges(two_hosts, tmp_path):
    key = secret(tmp_path)
    serve = Serve(two_hosts, tmp_path, key)
    tree = Tree(two_hosts, tmp_path, nproc=1, mib=32, per_s=0.03)
    m = migrate(two_hosts, tree, serve.address, key, "--max-passes", "8")
    out, err = m.communicate(timeout=60)
    assert m.returncode == 0, out + err
    passes = PASS_LINE.findall(out)
    assert passes[-1][1] == "dump"
    assert len(passes) < 8, out            # it stopped because the delta got small, not at the limit
    assert int(passes[-1][5]) < int(passes[0][5]) / 4, out
    assert serve.result()[0] == 0
    tree.assert_counts_on(tree.mark())


def test_a_final_pass_whose_pages_went_during_its_dump_reports_the_links_rate(two_hosts, tmp_path):
    """The final pass's pages files cross the link while its dump still waits for the VMAs' flags.
    Its line counted only the sending after the dump, and reported 46779.8 MiB/s on a 400 Mbit/s link;
    now the early sending is counted as send time (and said to be inside the dump)."""
    key = secret(tmp_path)
    serve = Serve(two_hosts, tmp_path, key)
    two_hosts.shape("100mbit")                  # 11.9 MiB/s
    tree = Tree(two_hosts, tmp_path, nproc=1, mib=16, per_s=1.0)
    m = migrate(two_hosts, tree, serve.address, key, "--max-passes", "2")
    out, err = m.communicate(timeout=90)
    assert m.returncode == 0, out + err
    final = PASS_LINE.findall(out)[-1]
    assert final[1] == "dump" and int(final[5]) > 4 << 20, out     # megabytes: the rate is measurable
    assert "during the dump)" in out and float(final[7]) < 2 * 11.9, out
    assert serve.result()[0] == 0


TIOCGPTN = 0x80045430
PTY_HOLDER = r"""
import os, sys, time
master, slave = os.openpty()
print(os.ttyname(slave), flush=True)
while True:
    time.sleep(0.05)
"""


def take_pty_index(ptmx, index):
    """Open ptmx until devpts hands out `index` (it gives the lowest free one: the lower ones are held
    meanwhile) -> the fds held, the one of `index` last."""
    held = []
    try:
        while True:
            held.append(os.open(ptmx, os.O_RDWR | os.O_NOCTTY))
            got = struct.unpack("i", fcntl.ioctl(held[-1], TIOCGPTN, b"\0" * 4))[0]
            assert got <= index, f"index {index} of {ptmx} is taken by someone else"
            if got == index:
                return held
    except BaseException:
        for fd in held:
            os.close(fd)
        raise


def test_a_pty_name_taken_on_the_destination_is_refused_at_the_first_pass(two_hosts, tmp_path):
    """The replica opens its ptys only at the final pass (its tree is made first), so a /dev/pts/N taken
    on the destination was found there, after every pre-dump pass had crossed the link. Now the first
    set's checks ask for it: refused at once, and the source runs on."""
    key = secret(tmp_path)
    serve = Serve(two_hosts, tmp_path, key)
    holder = two_hosts.source([sys.executable, "-c", PTY_HOLDER], stdout=subprocess.PIPE, text=True)
    held = []
    try:
        index = int(holder.stdout.readline().rsplit("/", 1)[1])
        # the destination's own devpts instance (another host's), reached through serve's root
        held = take_pty_index(f"/proc/{serve.pid()}/root/dev/ptmx", index)
        m = two_hosts.source(two_hosts.pycr("migrate", "-t", holder.pid, "--to", serve.address, "--secret-file",
                                            key, "--max-passes", "3"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = m.communicate(timeout=60)
        assert m.returncode != 0, out + err
        assert f"/dev/pts/{index} is in use" in err.strip().splitlines()[-1], err
        assert "pass 1" not in out, out                 # refused with the first set, before any other
        procutil.assert_running_untraced(holder.pid)
        assert serve.result()[0] != 0
        assert_destination_empty(serve)
    finally:
        for fd in held:
            os.close(fd)
        holder.kill()
        holder.wait()


def readable_ranges(pid):
    """[start, end, perms, path] of every readable range but the kernel's own ([vdso], [vvar]...),
    neighbouring mappings of one file and protection taken as one (the kernel merges them or not)."""
    ranges = []
    for start, end, perms, path in procutil.maps(pid):
        if perms[0] != "r" or path in ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]"):
            continue
        if ranges and ranges[-1][1] == start and ranges[-1][2:] == [perms, path]:
            ranges[-1][1] = end
        else:
            ranges.append([start, end, perms, path])
    return ranges


def assert_same_memory(source, copy):
    """Every readable byte of process `copy` is that of `source` -> bytes compared. The one thing
    allowed to differ is what the kernel writes into a thread's rseq area on each return to user
    space (pycr's injected calls are such returns): cpu_id_start and cpu_id, the first two u32 of a
    32-byte aligned struct rseq, each a CPU number."""
    ranges = readable_ranges(source)
    assert ranges == readable_ranges(copy)
    for start, end, _, path in ranges:
        a, b = procutil.read_memory(source, start, end - start), procutil.read_memory(copy, start, end - start)
        if a == b:
            continue
        words = sorted({i & ~3 for i in range(len(a)) if a[i] != b[i]})
        cpus = [int.from_bytes(m[w:w + 4], "little") for w in words for m in (a, b)]
        assert all((start + w) % 32 in (0, 4) for w in words) and max(cpus) < os.cpu_count(), \
            f"pid {copy}: {path or 'anonymous'} at {start:#x}: bytes at {[hex(start + w) for w in words][:8]} differ"
    return sum(end - start for start, end, _, _ in ranges)


def test_streamed_pages_make_the_source_memory_at_the_switch(two_hosts, tmp_path):
    """Every pre-dump's pages go into the replica as they arrive (the final set's come before the rest
    of its set, which then lands whole): held at the commit point (READY, the
    source frozen, the replica complete and stopped), every mapping of each replica process reads
    exactly as the source's. Then the source gives up there and runs on; the replica, never resumed
    without the source's word, is left stopped."""
    key = secret(tmp_path)
    serve = Serve(two_hosts, tmp_path, key, "-v", env=FAST_FAIL)
    tree = Tree(two_hosts, tmp_path, nproc=2, mib=4, per_s=0.2)
    m = held_at_ready(two_hosts, tree, serve, key, "--max-passes", "3", "--min-delta", "0")
    replica = {inner_pid(pid): pid for pid in serve.replica()}
    assert sum(assert_same_memory(pid, replica[pid]) for pid in tree.pids) > 2 * 4 << 20
    serve_err = stop_held(m, tree, serve)
    streamed = re.findall(r"pass (\d+-(?:pre-dump|dump)): \d+ pages files \(\d+ pages\) written into the replica "
                          r"as they arrived", serve_err)
    # the final set's pages crossed while the source still read the rest of its set: it landed whole
    assert streamed == ["01-pre-dump", "02-pre-dump"], serve_err
    assert "image set 03-dump received" in serve_err, serve_err


# A man in the middle that flips one bit of the first page of a process in the set of pass 2 and
# fixes up the frame's CRC-32C (possible without --tls: docs/trust.md). argv: port, destination, its port.
TAMPER = r'''
import socket, struct, sys, threading
from pycr.native.core import crc32c

listener = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("listening", flush=True)
src, _ = listener.accept()
dst = socket.create_connection((sys.argv[2], int(sys.argv[3])))

def back():
    while data := dst.recv(1 << 16):
        src.sendall(data)
    src.shutdown(socket.SHUT_WR)
threading.Thread(target=back, daemon=True).start()

def exact(n):
    buf = b""
    while len(buf) < n:
        got = src.recv(n - len(buf))
        if not got:
            raise SystemExit(0)
        buf += got
    return buf

dst.sendall(exact(12))                          # the hello
number, name, done = 0, "", False
while True:
    header = exact(12)
    ftype, length = header[0], struct.unpack_from("<I", header, 8)[0]
    payload = bytearray(exact(length))
    crc = exact(4)
    if ftype == 21:                             # SET_BEGIN: number u32, name, final u8
        number = struct.unpack_from("<I", payload)[0]
    elif ftype == 22:                           # SET_FILE: name (u32 length, bytes), size u64
        name = payload[4:4 + struct.unpack_from("<I", payload)[0]].decode()
    elif ftype == 11 and number == 2 and not done and name.startswith("pages-") and name[6:-4].isdigit():
        payload[100] ^= 1
        crc = struct.pack("<I", crc32c(bytes(payload), crc32c(header)))
        done = True
        print(f"flipped a bit of {name} in pass {number}", flush=True)
    dst.sendall(header + payload + crc)
'''


def test_a_tampered_page_in_a_later_pass_kills_the_replica_and_the_source_runs_on(two_hosts, tmp_path):
    """Streamed pages are checked against the manifest's CRC-32C per MiB before they enter the replica:
    a page changed on the way (frame checksum fixed up) fails pass 2, the replica is killed, the source
    thaws and runs on as it was."""
    key = secret(tmp_path)
    serve = Serve(two_hosts, tmp_path, key, env=FAST_FAIL)
    tree = Tree(two_hosts, tmp_path, nproc=2, mib=4, per_s=0.2)
    script = tmp_path / "tamper.py"
    script.write_text(TAMPER)
    port = random.randrange(20000, 60000)
    proxy = two_hosts.source([sys.executable, str(script), str(port), two_hosts.dst_addr, str(serve.port)],
                             stdout=subprocess.PIPE, text=True)
    assert proxy.stdout.readline().strip() == "listening"
    m = migrate(two_hosts, tree, f"127.0.0.1:{port}", key, "--max-passes", "4", "--min-delta", "0",
                env=FAST_FAIL)
    out, err = m.communicate(timeout=60)
    assert m.returncode == 1, out + err
    assert proxy.stdout.readline().startswith("flipped a bit of pages-"), out + err
    assert len(PASS_LINE.findall(out)) == 1, out        # pass 1 was applied, pass 2 was not
    status, _, serve_err = serve.result()
    assert status == 1, serve_err
    assert re.search(r"02-pre-dump/pages-\d+\.img: checksum mismatch in bytes 0-\d+: the pages are corrupt",
                     serve_err), serve_err
    tree.assert_unharmed()
    assert_destination_empty(serve)


# ---------------------------------------------------------------- failures

def test_a_wrong_secret_is_refused_and_nothing_runs(two_hosts, tmp_path):
    serve = Serve(two_hosts, tmp_path, secret(tmp_path))
    tree = Tree(two_hosts, tmp_path, nproc=2, mib=1, per_s=0)
    m = migrate(two_hosts, tree, serve.address, secret(tmp_path, "other"))
    out, err = m.communicate(timeout=30)
    assert m.returncode == 1
    assert "secret" in err and len(err.strip().splitlines()) == 1, err
    status, _, serve_err = serve.result()
    assert status == 1 and "failed authentication" in serve_err, serve_err
    tree.assert_unharmed()
    assert_destination_empty(serve)


def test_a_silent_connection_holds_no_source_back(two_hosts, tmp_path):
    """Connections to serve's port are greeted side by side: one that comes first and says nothing (its
    deadline, PYCR_NET_TIMEOUT, set far longer than the migration takes) keeps the source that comes
    next from waiting, and the tree moves."""
    env = {"PYCR_NET_TIMEOUT": "60", "PYCR_NET_IDLE_TIMEOUT": "60"}
    key = secret(tmp_path)
    serve = Serve(two_hosts, tmp_path, key, env=env)
    tree = Tree(two_hosts, tmp_path, nproc=1, mib=1, per_s=0)
    silent = two_hosts.connect(two_hosts.src_ns, two_hosts.dst_addr, serve.port)
    try:
        started = time.monotonic()
        m = migrate(two_hosts, tree, serve.address, key, "--max-passes", "2", env=env)
        out, err = m.communicate(timeout=50)
        assert m.returncode == 0, out + err
        # greeted after the silent peer, the source would wait out its 60 s deadline
        assert time.monotonic() - started < 30, out
        status, _, serve_err = serve.result()
        assert status == 0, serve_err
        tree.assert_counts_on(tree.mark())
    finally:
        silent.close()


def test_a_flood_of_silent_connections_from_one_address_keeps_no_source_out(two_hosts, tmp_path):
    """serve greets at most 16 connections at once. One address that held all 16, silent, kept every other
    peer out, the real source included (refused at once). Now one address holds at most 4 of them: the
    rest of its flood is refused, and the source, from its own address, is greeted and moves its tree."""
    env = {"PYCR_NET_TIMEOUT": "60", "PYCR_NET_IDLE_TIMEOUT": "60"}
    key = secret(tmp_path)
    serve = Serve(two_hosts, tmp_path, key, env=env)
    tree = Tree(two_hosts, tmp_path, nproc=1, mib=1, per_s=0)
    other = two_hosts.second_source_address()
    flood = []
    try:
        for _ in range(16):
            flood.append(two_hosts.connect(two_hosts.src_ns, two_hosts.dst_addr, serve.port, source=other))
        m = migrate(two_hosts, tree, serve.address, key, "--max-passes", "2", env=env)
        out, err = m.communicate(timeout=50)
        assert m.returncode == 0, out + err
        status, _, serve_err = serve.result()
        assert status == 0, serve_err
        assert f"4 connections from {other} are being greeted" in serve_err, serve_err
        tree.assert_counts_on(tree.mark())
    finally:
        for sock in flood:
            sock.close()


def test_link_cut_during_a_pass_leaves_the_source_running(two_hosts, tmp_path):
    key = secret(tmp_path)
    two_hosts.shape("40mbit")
    serve = Serve(two_hosts, tmp_path, key, env=FAST_FAIL)
    tree = Tree(two_hosts, tmp_path, nproc=2, mib=8, per_s=0.02)
    m = migrate(two_hosts, tree, serve.address, key, env=FAST_FAIL)
    # the first pass is on its way (about 4 s of it at 40 Mbit/s)
    assert procutil.wait_until(lambda: any(os.scandir(d.path) for d in os.scandir(serve.work)
                                           if d.is_dir()) if serve.work.exists() else False, timeout=20)
    time.sleep(0.5)
    two_hosts.cut()
    out, err = m.communicate(timeout=30)
    assert m.returncode == 1, out + err
    assert "dump" not in "".join(PASS_LINE.findall(out)[-1:]), out
    status, _, serve_err = serve.result()
    assert status == 1, serve_err
    tree.assert_unharmed()
    assert_destination_empty(serve)


def test_a_final_pass_stopped_after_its_pages_went_ahead_leaves_the_source_running(two_hosts, tmp_path):
    """The final pass sends its pages files before the rest of its set is written: stopped right
    after (at its "write core and mm" step, which follows the pages in a final pass), the source
    has sent them, the migration fails on SIGTERM, the source runs on unharmed and the destination
    discards the half-sent set."""
    key = secret(tmp_path)
    args = ("--max-passes", "2", "--min-delta", "0")
    # the step's number, from a whole migration of a tree of the same shape
    count = tmp_path / "steps"
    first = tmp_path / "first"
    first.mkdir()
    serve = Serve(two_hosts, first, key)
    m = migrate(two_hosts, Tree(two_hosts, first, nproc=1, mib=2, per_s=0), serve.address, key, *args,
                env={"PYCR_COUNT_STEPS": str(count)})
    out, err = m.communicate(timeout=60)
    assert m.returncode == 0, out + err
    assert serve.result()[0] == 0
    at = [line.split()[0] for line in count.read_text().splitlines() if "write core and mm of" in line][-1]

    serve = Serve(two_hosts, tmp_path, key, env=FAST_FAIL)
    tree = Tree(two_hosts, tmp_path, nproc=1, mib=2, per_s=0)
    m = migrate(two_hosts, tree, serve.address, key, *args, env=dict(FAST_FAIL, PYCR_STOP_AT_STEP=at))
    line = m.stderr.readline()
    assert line.startswith("pycr: stopped at step") and "write core and mm of" in line, line + m.stderr.read()
    assert procutil.wait_until(lambda: list(serve.work.glob("*/02-dump/pages-*.img")), timeout=10), \
        "the final pass's pages file did not go ahead of its set"
    m.send_signal(signal.SIGTERM)
    out, err = m.communicate(timeout=30)
    assert m.returncode != 0, out + err
    tree.assert_unharmed()
    status, _, serve_err = serve.result()
    assert status == 1, serve_err
    assert_destination_empty(serve)


def test_destination_killed_mid_migration_leaves_the_source_running(two_hosts, tmp_path):
    key = secret(tmp_path)
    two_hosts.shape("40mbit")
    serve = Serve(two_hosts, tmp_path, key, env=FAST_FAIL)
    tree = Tree(two_hosts, tmp_path, nproc=2, mib=4, per_s=0.3)   # pass 2 is large too
    m = migrate(two_hosts, tree, serve.address, key, env=FAST_FAIL)
    # once the replica exists (the first pass applied), the destination dies
    assert procutil.wait_until(lambda: len(serve.replica()) >= 2, timeout=30)
    procutil.kill(serve.pid(), signal.SIGKILL)
    out, err = m.communicate(timeout=30)
    assert m.returncode == 1, out + err
    assert not re.search(r"^downtime", out, re.M), out
    tree.assert_unharmed()
    assert procutil.wait_until(lambda: two_hosts.dest_processes(serve.proc) == [], timeout=10), \
        "the replica outlived its pycr serve"


def test_link_lost_at_the_commit_point_keeps_the_replica_stopped(two_hosts, tmp_path):
    """READY came, then the link died and the source gave up (thawed): the destination cannot know
    whether the source still runs, so it never resumes the replica: it is left stopped."""
    key = secret(tmp_path)
    serve = Serve(two_hosts, tmp_path, key, env=FAST_FAIL)
    tree = Tree(two_hosts, tmp_path, nproc=2, mib=1, per_s=0)
    m = held_at_ready(two_hosts, tree, serve, key)
    two_hosts.cut()
    serve_err = stop_held(m, tree, serve)
    replica = serve.replica()
    assert len(replica) >= 2
    for _ in range(3):
        time.sleep(0.3)
        assert all(procutil.state(pid) == "T" for pid in replica[1:]), \
            [(pid, procutil.state(pid)) for pid in replica]



def test_a_downtime_budget_is_kept_over_the_link(two_hosts, tmp_path):
    """The convergence policy runs on the link's figures: each pass line gives the expected
    downtime and the throttle, the final dump comes on the budget, and the summary says how it went."""
    key = secret(tmp_path)
    serve = Serve(two_hosts, tmp_path, key)
    tree = Tree(two_hosts, tmp_path, nproc=1, mib=32, per_s=0.03)
    m = migrate(two_hosts, tree, serve.address, key, "--max-passes", "8", "--downtime-limit", "2000",
                "--bandwidth-limit", "16M")
    out, err = m.communicate(timeout=90)
    assert m.returncode == 0, out + err
    passes = PASS_LINE.findall(out)
    assert passes[-1][1] == "dump" and len(passes) < 8, out
    pre_dumps = [line for line in out.splitlines() if re.match(r"pass \d+ pre-dump", line)]
    assert pre_dumps and all("throttle 0 %" in line for line in pre_dumps), out
    assert all("expected downtime" in line for line in pre_dumps[1:]), out
    rates = [float(x) for x in re.findall(r"([0-9.]+) MiB/s sent", out)]
    assert max(rates) <= 16.05, rates                       # paced to --bandwidth-limit
    assert re.search(r"^downtime budget 2000 ms (met|missed by \d+ ms)", out, re.M), out
    assert serve.result()[0] == 0
    tree.assert_counts_on(tree.mark())


def test_serve_with_a_relative_work_dir_keeps_serving_and_reaps_a_finished_replica(two_hosts, tmp_path):
    """-W given relative (the pass chain is checked by real paths); a wrong-secret peer is refused on stderr
    without ending serve; when the replica ends, serve (still running) reaps it: no zombie under it."""
    key = secret(tmp_path)
    port = random.randrange(20000, 60000)
    work = os.path.relpath(tmp_path / "dst-work")
    proc = two_hosts.destination(two_hosts.pycr("serve", "--listen", f"{two_hosts.dst_addr}:{port}",
                                                "--secret-file", key, "-W", work),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "listening on" in proc.stdout.readline()
    address = f"{two_hosts.dst_addr}:{port}"
    tree = Tree(two_hosts, tmp_path, nproc=2, mib=4, per_s=0)
    wrong = migrate(two_hosts, tree, address, secret(tmp_path, "other"))
    wrong.communicate(timeout=60)
    assert wrong.returncode == 1
    line = proc.stderr.readline()
    assert line.startswith("pycr: serve: refused peer ") and "failed authentication" in line, line
    assert line.rstrip().endswith("; still listening"), line
    m = migrate(two_hosts, tree, address, key)
    out, err = m.communicate(timeout=60)
    assert m.returncode == 0, out + err
    assert len(PASS_LINE.findall(out)) >= 2, out
    assert "serve: replica from" in proc.stdout.readline()
    tree.assert_counts_on(tree.mark())
    serve_pid = next(pid for pid in two_hosts.dest_processes(proc)
                     if b"serve" in (procutil._read(f"/proc/{pid}/cmdline") or b""))
    replica = [pid for pid in two_hosts.dest_processes(proc) if pid != serve_pid]
    assert replica
    for pid in replica:
        procutil.kill(pid, signal.SIGKILL)
    assert procutil.wait_until(lambda: procutil.children(serve_pid) == [], timeout=10), \
        [(pid, procutil.state(pid)) for pid in procutil.children(serve_pid)]
    assert procutil.state(serve_pid) not in (None, "Z", "X"), "serve ended"


# ---------------------------------------------------------------- --host-pids

def inner_pid(pid):
    """The PID a process has inside its own (innermost) PID namespace."""
    return int(procutil.status(pid)["NSpid"].split()[-1])


def test_host_pids_keeps_both_pids_on_the_destination(two_hosts, tmp_path):
    """serve --host-pids: no PID namespace of the replica's own; its processes take their PIDs in the
    destination's (this test's destination namespace stands for the other host's) and go on counting."""
    key = secret(tmp_path)
    serve = Serve(two_hosts, tmp_path, key, "--host-pids")
    tree = Tree(two_hosts, tmp_path, nproc=2, mib=4, per_s=0.02)
    before = tree.latest()
    m = migrate(two_hosts, tree, serve.address, key)
    out, err = m.communicate(timeout=60)
    assert m.returncode == 0, out + err
    assert "(its original PIDs on that host)" in out, out
    downtime = float(re.search(r"^downtime ([0-9.]+) s", out, re.M).group(1))
    assert downtime < 10, out
    assert tree.proc.wait(timeout=10) == -signal.SIGKILL
    status, _, serve_err = serve.result()
    assert status == 0, serve_err
    after = tree.assert_counts_on(tree.mark())
    assert {idx: pid for idx, (pid, _, _) in after.items()} == {idx: pid for idx, (pid, _, _) in before.items()}
    replica = serve.replica()
    assert sorted(inner_pid(pid) for pid in replica) == sorted(pid for pid, _, _ in before.values()), replica
    for pid in replica:
        procutil.assert_running_untraced(pid)


@pytest.mark.parametrize("mode", ["pre-copy", "post-copy"])
def test_host_pids_refuses_a_pid_taken_on_the_destination(two_hosts, tmp_path, mode):
    """A PID of the tree already in use over there: one line, nothing created, the source untouched
    (in post-copy too, whose set is checked as it arrives)."""
    key = secret(tmp_path)
    serve = Serve(two_hosts, tmp_path, key, "--host-pids")
    tree = Tree(two_hosts, tmp_path, nproc=2, mib=2, per_s=0)
    taken = tree.pids[1]
    # a process with that PID in the destination's PID namespace (ns_last_pid: the next fork there gets it)
    init = two_hosts.dest_init(serve.proc)
    blocker = two_hosts._start(["nsenter", f"--target={init}", "--pid", "--mount", "--", "sh", "-c",
                                f"echo {taken - 1} > /proc/sys/kernel/ns_last_pid; sleep 1000 & wait"])
    assert procutil.wait_until(lambda: any(inner_pid(p) == taken for p in procutil.descendants(blocker.pid)
                                           if procutil.status(p)), timeout=10)
    m = migrate(two_hosts, tree, serve.address, key, "--mode", mode)
    out, err = m.communicate(timeout=60)
    assert m.returncode == 1, out + err
    line = err.strip()
    assert len(line.splitlines()) == 1 and f"pid {taken} " in line and "in use" in line, err
    assert "--host-pids" in line, err
    status, _, serve_err = serve.result()
    assert status == 1 and f"pid {taken} " in serve_err, serve_err
    tree.assert_unharmed()
    assert serve.replica() == []           # the blocker entered the namespace from outside: not below its init
    assert not serve.work.exists() or os.listdir(serve.work) == []


def test_a_pass_line_without_a_measured_bandwidth():
    """A final pass that copied too little for the policy to measure (hybrid's, whose dirtied pages
    move later) still gets its line."""
    from pycr.net.migrate_source import NetPassReport
    rep = NetPassReport(number=3, kind="dump", added=0, removed=0, recreated=0, pages=0, bytes=4096,
                        dump_seconds=0.1, send_seconds=0.0, apply_seconds=0.05, dirty_rate=None, bandwidth=None)
    assert rep.line().endswith(", - MiB/s sent, dirty -"), rep.line()
