"""Two hosts on one machine: two network namespaces joined by a veth pair.

`two_hosts` (a fixture) gives a TwoHosts: the source namespace and the
destination one, each with its end of the veth and an address of a private
/30 chosen at random, names unique to this test run. Processes started with
`source()` run in the source namespace (only the network is switched:
nsenter --net, so the tree and pycr share this machine's mounts and PIDs);
`destination()` runs a command in the destination namespace and also in new
PID and mount namespaces (unshare -pmf --mount-proc, with a devpts instance
of its own) under a small shell that stays as their init, so a replica
outlives a `pycr serve --once`.
`connect(ns, addr, port)` is a client socket of this process made in either
namespace (a socket stays in the network namespace it was made in);
`service_addr` is an address that can move from the source to the
destination with the service bound to it (share_service_address,
move_service_address).
At the end (even on failure) every process started here is killed by PID,
then both namespaces (and with them the veth) are deleted.
"""

import contextlib
import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest

import procutil
from pycr.abi import CLONE_NEWNET

WORKTREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def in_netns(name):
    """This thread in network namespace `name` for the block (sockets made there stay there)."""
    setns = ctypes.CDLL(None, use_errno=True).setns
    with open(f"/run/netns/{name}") as there, open("/proc/thread-self/ns/net") as here:
        if setns(there.fileno(), CLONE_NEWNET):
            raise OSError(ctypes.get_errno(), f"setns {name}")
        try:
            yield
        finally:
            if setns(here.fileno(), CLONE_NEWNET):
                raise OSError(ctypes.get_errno(), "setns back")


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class TwoHosts:
    def __init__(self):
        tag = f"{os.getpid() % 10000}{random.randrange(1000):03d}"
        self.src_ns, self.dst_ns = f"pycr-src-{tag}", f"pycr-dst-{tag}"
        self.src_if, self.dst_if = f"pyv{tag}s", f"pyv{tag}d"
        net = f"10.{random.randrange(64, 250)}.{random.randrange(1, 250)}"
        base = random.randrange(0, 63) * 4
        self.src_addr, self.dst_addr = f"{net}.{base + 1}", f"{net}.{base + 2}"
        self.service_addr = f"{net}.{(base + 128) % 256 + 1}"     # see share_service_address
        self.procs = []             # Popen of everything started here
        self.made = []

    def setup(self):
        for ns in (self.src_ns, self.dst_ns):
            _ip("netns", "add", ns)
            self.made.append(ns)
        _ip("link", "add", self.src_if, "netns", self.src_ns, "type", "veth", "peer", "name", self.dst_if,
            "netns", self.dst_ns)
        for ns, ifname, addr in ((self.src_ns, self.src_if, self.src_addr), (self.dst_ns, self.dst_if, self.dst_addr)):
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", ifname)
            _ip("-n", ns, "link", "set", ifname, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def share_service_address(self):
        """service_addr on both hosts' loopback (the source's is the one its peers reach), as a service
        address that is about to move: the destination has it before the migration."""
        for ns in (self.src_ns, self.dst_ns):
            _ip("-n", ns, "addr", "add", f"{self.service_addr}/32", "dev", "lo")

    def move_service_address(self):
        """service_addr leaves the source, which now reaches it at the destination."""
        _ip("-n", self.src_ns, "addr", "del", f"{self.service_addr}/32", "dev", "lo")
        _ip("-n", self.src_ns, "route", "add", f"{self.service_addr}/32", "via", self.dst_addr)

    def second_source_address(self):
        """service_addr on the source's loopback, routed from the destination: a second peer address
        on the source host -> it."""
        _ip("-n", self.src_ns, "addr", "add", f"{self.service_addr}/32", "dev", "lo")
        _ip("-n", self.dst_ns, "route", "add", f"{self.service_addr}/32", "via", self.src_addr)
        return self.service_addr

    def shape(self, rate):
        """A token bucket (tbf) on the source's end: at most `rate` (tc's units, e.g. 40mbit)."""
        subprocess.run(["tc", "-n", self.src_ns, "qdisc", "add", "dev", self.src_if, "root", "tbf", "rate", rate,
                        "burst", "64kb", "latency", "100ms"], check=True, capture_output=True)

    def cut(self):
        """The link goes down on both ends."""
        _ip("-n", self.src_ns, "link", "set", self.src_if, "down")
        _ip("-n", self.dst_ns, "link", "set", self.dst_if, "down")

    def uncut(self):
        """The link comes back up on both ends (a TCP connection that saw no reset lives on)."""
        _ip("-n", self.src_ns, "link", "set", self.src_if, "up")
        _ip("-n", self.dst_ns, "link", "set", self.dst_if, "up")

    def _start(self, argv, env=None, **kw):
        p = subprocess.Popen(argv, env=dict(os.environ, **(env or {})), stdin=subprocess.DEVNULL,
                             close_fds=True, **kw)
        self.procs.append(p)
        return p

    def source(self, argv, env=None, **kw):
        """argv in the source's network namespace (its PID is the Popen's)."""
        return self._start(self.in_source(argv), env, **kw)

    def in_source(self, argv):
        """argv run in the source's network namespace (nsenter execs it: the same PID)."""
        return ["nsenter", f"--net=/run/netns/{self.src_ns}", "--", *map(str, argv)]

    def destination(self, argv, env=None, **kw):
        """argv in the destination's network, PID and mount namespaces (its own /dev/pts); its shell init
        stays after it."""
        # a devpts instance of its own, as another host has: its /dev/pts/N are not the source's
        script = ('mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts /dev/pts && '
                  'mount --bind /dev/pts/ptmx /dev/ptmx || exit 1; "$@"; echo "exit $?" >&2; exec sleep 100000')
        return self._start(["nsenter", f"--net=/run/netns/{self.dst_ns}", "--", "unshare", "-pmf", "--mount-proc",
                            "--", "sh", "-c", script, "sh", *argv], env, **kw)

    @staticmethod
    def dest_init(p):
        """Host PID of the destination namespace's init (the shell, later sleep), or None."""
        kids = procutil.children(p.pid)
        return kids[0] if kids else None

    def dest_processes(self, p):
        """Host PIDs of every live process in the destination's PID namespace but its init."""
        init = self.dest_init(p)
        if init is None:
            return []
        return [pid for pid in procutil.descendants(init) if procutil.state(pid) not in (None, "Z", "X")]

    @staticmethod
    def connect(ns, addr, port, timeout=10.0, source=None):
        """A TCP connection from namespace ns to addr:port (from the address `source`, if given); a refused
        connect is tried again until timeout."""
        deadline = time.monotonic() + timeout
        while True:
            with in_netns(ns):
                sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                if source:
                    sock.bind((source, 0))
                sock.connect((addr, port))
                return sock
            except ConnectionRefusedError:          # a server still starting
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
            except BaseException:
                sock.close()
                raise

    def pycr(self, *args):
        return [sys.executable, "-m", "pycr", *map(str, args)]

    def close(self):
        for p in self.procs:
            pids = [p.pid, *procutil.descendants(p.pid)]
            for pid in reversed(pids):
                procutil.kill(pid, signal.SIGKILL)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for ns in self.made:
            _ip("netns", "del", ns, check=False)


@pytest.fixture
def two_hosts():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    hosts = TwoHosts()
    try:
        hosts.setup()
        yield hosts
    finally:
        hosts.close()
