"""The watchdog: the daemon's death must kill the lazily restored tree, never leave it running.

If the last reference to a userfaultfd is closed while pages are still missing,
the kernel drops its registrations and fills later faults with zero pages: the
tree would run with wrong memory. So a helper forked from the daemon (before
it has threads or sockets) holds a duplicate of every uffd and a pidfd of every
restored process. Holding the uffd keeps a faulting thread waiting instead of
getting zeros; if the daemon dies (its socket to the helper reaches end of
file, or its pidfd turns readable) before it said "release", the helper stops
and then SIGKILLs every restored process and every descendant they forked,
waits for them to be gone, and only then lets the uffds go.
"""

import contextlib
import os
import select
import signal
import socket
import time

from .. import proc
from ..errors import PycrError
from ..log import log
from ..native import core
from . import protocol


class Watchdog:
    """The daemon's handle on its helper."""

    def __init__(self, pid, sock):
        self.pid, self.sock = pid, sock

    def hold(self, pidfd, uffd):
        """The helper holds its own copies of both before the task may run."""
        protocol.call(self.sock, {"op": "hold"}, [pidfd, uffd])

    def release(self):
        """Every page is placed: the helper lets go and exits."""
        self._end("release")

    def kill(self):
        """Kill the tree (a failed restore or serve) and wait for the helper -> True only if the
        helper saw every task it held exit (a pidfd poll) and every descendant it found gone:
        then no task of the tree can run again."""
        return self._end("kill").get("gone", False)

    def _end(self, op):
        reply = {}
        with contextlib.suppress(OSError, protocol.ProtocolError):
            reply = protocol.call(self.sock, {"op": op})
        self.sock.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        return reply


def start():
    """Fork the helper; call it before the daemon makes threads or opens its socket."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    daemon = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            mine.close()
            code = _run(theirs, daemon)
        finally:
            os._exit(code)
    theirs.close()
    return Watchdog(pid, mine)


def _run(sock, daemon):
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTSTP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)      # the terminal's signals are for the daemon
    daemon_fd = core.pidfd_open(daemon)
    held = []
    alive = os.getppid() == daemon
    while alive:
        ready, _, _ = select.select([sock, daemon_fd], [], [])
        if daemon_fd in ready:
            break
        msg, fds = protocol.recv(sock)
        if msg is None or msg.get("op") == "kill":
            break
        if msg["op"] == "hold":
            held.append(fds)
            protocol.send(sock, {"ok": True})
        elif msg["op"] == "release":
            _close(held)
            protocol.send(sock, {"ok": True})
            return 0
    killed, gone = kill_tree([pidfd for pidfd, _ in held])
    if killed:
        log.warning("lazy-pages watchdog: the page server stopped before every page was placed: "
                    "killed %d task(s) of the restored tree", killed)
    _close(held)
    with contextlib.suppress(OSError):
        protocol.send(sock, {"ok": True, "gone": gone})
    return 0


def _close(held):
    for fds in held:
        for fd in fds:
            os.close(fd)
    held.clear()


def _pid_of(pidfd):
    """The PID a pidfd refers to (-1 once the process is gone), from its fdinfo."""
    try:
        return int(proc.fdinfo(os.getpid(), pidfd).extra.get("Pid", ["-1"])[0])
    except (PycrError, ValueError):
        return -1


def _children(pid):
    try:
        return proc.children(pid)
    except PycrError:
        return []


def kill_tree(pidfds, timeout=10.0):
    """SIGSTOP the processes and all their descendants until no new one appears, then SIGKILL
    them all and wait until they are gone. -> (number of processes killed, whether every one is
    known to have exited: each pidfd polls readable, each descendant is a zombie or gone)."""
    roots = [p for p in (_pid_of(fd) for fd in pidfds) if p > 0]
    for fd in pidfds:
        with contextlib.suppress(OSError):
            core.pidfd_send_signal(fd, signal.SIGSTOP)
    found = set(roots)
    frontier = list(roots)
    while frontier:
        pid = frontier.pop()
        for child in _children(pid):
            if child not in found:
                found.add(child)
                with contextlib.suppress(OSError):
                    os.kill(child, signal.SIGSTOP)
                frontier.append(child)
    for fd in pidfds:
        with contextlib.suppress(OSError):
            core.pidfd_send_signal(fd, signal.SIGKILL)
    for pid in found - set(roots):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    for fd in pidfds:
        select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
    for pid in found - set(roots):
        while proc.exists(pid) and time.monotonic() < deadline and _state(pid) not in ("Z", "X", ""):
            time.sleep(0.005)
    exited = all(select.select([fd], [], [], 0)[0] for fd in pidfds)
    gone = exited and all(_state(pid) in ("Z", "X", "") for pid in found - set(roots))
    return len(found), gone


def _state(pid):
    try:
        return proc.stat(pid).state
    except PycrError:
        return ""
