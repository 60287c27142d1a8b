"""What pycr may leave in a tree it could not finish with, found and taken out.

pycr undoes everything it puts into a task, on success, on error and on
SIGINT/SIGTERM/SIGHUP. Only its death by SIGKILL (or the OOM killer) at an
unlucky instant can leave something behind, and none of it changes what the
program does:
- its dirty-page tracker's userfaultfd (pre-dump), recognised by the flags and
  features pycr creates it with (O_NONBLOCK|O_CLOEXEC; WP_ASYNC|WP_UNPOPULATED,
  or none yet when pycr died before UFFDIO_API);
- its syscall trampoline in the zero padding of [vdso] (never executed once
  the task has left the injection; a freeze that finds a thread still on
  its way out runs it out first, see FrozenTree._leave_trampolines);
- SO_PEEK_OFF of a unix socket it was peeking through (the value before is
  in its journal: see pycr/collect/skqueue.py).
- TCP connections in repair mode, if it died while it read one or just before
  a kill (a dump with --tcp-established): the program can neither send nor
  receive on them (recv fails with EPERM) until repair mode is off. getsockopt(TCP_REPAIR) reads the flag back; cleanup turns
  it off through pycr's own copy of the socket (SO_REUSEADDR, which repair mode
  clears, comes back off). A program that uses repair mode itself is rare; its
  sockets would be listed too.
- pycr's socket filter on those connections (pycr.tcp_lock): it drops every
  segment the peer sends. It is recognised by its instructions (SO_GET_FILTER
  gives them back) and detached.
- the CPU throttle of a migration's auto-converge (pycr.migrate.throttle): the
  tree in a cgroup named pycr-throttle-ROOT with a CPU quota. The name says
  where its tasks came from; cleanup moves every task back and removes it.
`pycr check -t PID` lists them; `pycr cleanup -t PID` takes them out, and so
does every dump and pre-dump of the tree before it looks at its fds.
"""

import os
from dataclasses import dataclass

from pycr import abi, proc
from pycr.abi import O_LARGEFILE, UFFD_FEATURE_INITIALIZED, UFFD_LINK, UFFD_PYCR_FEATURES, UFFD_PYCR_FLAGS
from pycr.errors import PycrError, TaskGone
from pycr.log import log
from pycr.ptrace import sigframe
from pycr.ptrace import batch
from pycr.ptrace.inject import vdso_text_end


@dataclass
class Leftover:
    pid: int
    what: str        # "userfaultfd", "trampoline", "peek-off", "tcp-repair", "tcp-lock" or "throttle"
    where: int       # fd number or address (the cgroup directory for "throttle")
    detail: str

    def __str__(self):
        if self.what == "userfaultfd":
            return f"pid {self.pid} fd {self.where}: pycr's userfaultfd ({self.detail})"
        if self.what == "peek-off":
            return f"pid {self.pid} fd {self.where}: unix socket's SO_PEEK_OFF changed by pycr ({self.detail})"
        if self.what == "tcp-repair":
            return f"pid {self.pid} fd {self.where}: TCP connection {self.detail} left in repair mode by pycr's dump"
        if self.what == "tcp-lock":
            return (f"pid {self.pid} fd {self.where}: TCP connection {self.detail} locked by pycr's socket filter "
                    "(it drops everything the peer sends)")
        if self.what == "throttle":
            return f"pid {self.pid}: in pycr's CPU throttle cgroup {self.where} ({self.detail})"
        return f"pid {self.pid}: pycr's syscall trampoline at {self.where:#x} in [vdso] padding"


def uffd_features(pid, fd):
    """The features of a userfaultfd from its fdinfo ("API: aa:<features>:<ioctls>"), or None."""
    info = proc.fdinfo(pid, fd)
    api = (info.extra.get("API") or [""])[0].split(":")
    if len(api) < 2:
        return info.flags, None
    return info.flags, int(api[1], 16) & ~UFFD_FEATURE_INITIALIZED


def pycr_uffds(pid, initialized_only=False, links=None):
    """fds of pid that are userfaultfds as pycr makes them. links: proc.fds(pid), if read already."""
    out = []
    for fd, link in (proc.fds(pid) if links is None else links).items():
        if link != UFFD_LINK:
            continue
        try:
            flags, features = uffd_features(pid, fd)
        except TaskGone:
            continue
        if flags & ~O_LARGEFILE != UFFD_PYCR_FLAGS:     # O_LARGEFILE may show too (read-only: O_RDONLY is 0)
            continue
        if features == UFFD_PYCR_FEATURES or (features == 0 and not initialized_only):
            out.append(fd)
    return out


def trampoline_span(pid):
    """(address, length) of pycr's trampoline in pid's [vdso], with its batch loop if
    that is there too, else None."""
    vdso = next((v for v in proc.maps(pid) if v.kind == "vdso"), None)
    if vdso is None:
        return None
    try:
        image = proc.read_mem(pid, vdso.start, vdso.size)
    except PycrError:
        return None
    end = vdso_text_end(image)
    if end is None:
        return None
    at = (end + 15) & ~15
    if image[at:at + len(sigframe.TRAMPOLINE)] != sigframe.TRAMPOLINE:
        return None
    with_loop = image[at:at + len(batch.VDSO_CODE)] == batch.VDSO_CODE
    return vdso.start + at, len(batch.VDSO_CODE) if with_loop else len(sigframe.TRAMPOLINE)


def trampoline_address(pid):
    """Where pycr's trampoline sits in pid's [vdso] if it is there, else None."""
    span = trampoline_span(pid)
    return None if span is None else span[0]


def find(root):
    """Every Leftover in the tree rooted at root."""
    from pycr.migrate import throttle
    out = []
    for pid in proc.descendants(root):
        try:
            for fd in pycr_uffds(pid):
                out.append(Leftover(pid, "userfaultfd", fd, "a pre-dump's dirty-page tracking: the chain's "
                                    "final dump takes it out, or a killed pycr left it"))
            addr = trampoline_address(pid)
            if addr is not None:
                out.append(Leftover(pid, "trampoline", addr, ""))
            out.extend(Leftover(pid, "peek-off", fd, f"it was {value}") for fd, value in peek_offs(pid))
            out.extend(Leftover(pid, "tcp-repair", fd, name) for fd, name in tcp_in_repair(pid))
            out.extend(Leftover(pid, "tcp-lock", fd, name) for fd, name in tcp_locked(pid))
            out.extend(Leftover(pid, "throttle", group, _quota(group)) for group in sorted(throttle.groups_of(pid)))
        except TaskGone:
            continue
    return out


def _journaled_sockets():
    """{inode: cookie} of the unix sockets whose SO_PEEK_OFF a killed pycr left changed."""
    from pycr.collect import skqueue
    try:
        names = os.listdir(skqueue.journal_dir())
    except FileNotFoundError:
        return {}
    out = {}
    for name in names:
        parts = name.split("-")
        if len(parts) == 4 and name.startswith("peek-off-") and parts[2].isdigit() and parts[3].isdigit():
            out[int(parts[2])] = int(parts[3])
    return out


def peek_offs(pid):
    """[(fd, value before)] of pid's unix sockets whose SO_PEEK_OFF a killed pycr changed."""
    journal = _journaled_sockets()
    if not journal:
        return []
    from pycr.collect import skqueue, unixdiag
    live = unixdiag.all_unix_sockets()
    out = []
    for fd, link in proc.fds(pid).items():
        if not link.startswith("socket:["):
            continue
        ino = int(link[8:-1])
        if ino in journal and ino in live and live[ino].cookie == journal[ino]:
            out.append((fd, skqueue.journaled(ino, journal[ino])))
    return out


def put_back_peek_offs(pid):
    """Give pid's unix sockets the SO_PEEK_OFF a killed pycr recorded. -> fds done."""
    import socket
    from pycr.collect import skqueue
    from pycr.native import core
    done = []
    journal = _journaled_sockets()
    for fd, _ in peek_offs(pid):
        ino = int(proc.fds(pid)[fd][8:-1])
        with socket.socket(fileno=core.dup_from(pid, fd)) as sock:
            skqueue.put_back(sock, ino, journal[ino])
        done.append(fd)
    return done


def _tcp_socket(pid, fd):
    """pycr's own socket object of pid's fd if it is a TCP socket over IP, else None."""
    import socket
    from pycr.native import core
    try:
        sock = socket.socket(fileno=core.dup_from(pid, fd))
    except OSError:
        return None
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM \
            and sock.proto == socket.IPPROTO_TCP:
        return sock
    sock.close()
    return None


def _tcp_sockets_where(pid, test, undo, what):
    """[(fd, "local <-> peer")] of pid's TCP sockets for which test(sock); undo(sock) on each if given."""
    out = []
    for fd, link in proc.fds(pid).items():
        if not link.startswith("socket:["):
            continue
        sock = _tcp_socket(pid, fd)
        if sock is None:
            continue
        with sock:
            try:
                if not test(sock):
                    continue
                name = f"{_show(sock.getsockname())} <-> {_show(sock.getpeername())}"
            except OSError:
                continue
            if undo:
                undo(sock)
                log.info("pid %d fd %d: TCP %s: %s", pid, fd, name, what)
            out.append((fd, name))
    return out


def tcp_in_repair(pid, undo=False):
    """[(fd, "local <-> peer")] of pid's TCP sockets in repair mode; undo: turn it off."""
    from pycr import tcp_repair
    return _tcp_sockets_where(pid, tcp_repair.in_repair, undo and tcp_repair.repair_off, "repair mode off")


def tcp_locked(pid, undo=False):
    """[(fd, "local <-> peer")] of pid's TCP sockets with pycr's filter on; undo: detach it."""
    from pycr import tcp_lock
    return _tcp_sockets_where(pid, tcp_lock.is_locked, undo and tcp_lock.unlock, "pycr's socket filter detached")


def _show(addr):
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


def close_stray_uffds(pid, leader, keep=(), links=None):
    """Close, by injection into the frozen leader, pycr's userfaultfds in pid other
    than those in keep (the ones the current pass tracks with). links: proc.fds(pid), if read
    already. -> fds closed."""
    from pycr.ptrace.inject import Injector
    from pycr.trackers.uffd import HIGHEST_FD
    # pycr puts its userfaultfd at the top of the fd table (below RLIMIT_NOFILE and
    # HIGHEST_FD): one of the program's own, lower down, is never taken for it.
    top = min(proc.rlimits(pid)[abi.RLIMIT_NOFILE][0], HIGHEST_FD + 1)
    stray = [fd for fd in pycr_uffds(pid, initialized_only=True, links=links) if fd not in keep and fd >= top - 64]
    if stray:
        with Injector(leader) as inj:
            for fd in stray:
                inj.call("close", fd)
        log.info("pid %d: closed userfaultfd(s) %s left by an earlier pycr run", pid, stray)
    return stray


def wipe_trampoline(pid):
    """Zero the trampoline bytes (and its batch loop's) in pid's [vdso] padding, as they were."""
    span = trampoline_span(pid)
    if span is None:
        return False
    fd = proc.open_mem(pid, write=True)
    try:
        os.pwrite(fd, bytes(span[1]), span[0])
    finally:
        os.close(fd)
    return True


def _quota(group):
    """A throttle group's quota, in words."""
    for name in ("cpu.cfs_quota_us", "cpu.max"):
        try:
            with open(os.path.join(group, name)) as f:
                return f"{name} {f.read().strip()}"
        except OSError:
            continue
    return "quota unknown"


def cleanup(root):
    """`pycr cleanup -t PID`: freeze the tree, take out every leftover, thaw. -> [Leftover]."""
    from pycr.freeze import freeze
    found = find(root)
    if not found:
        return []
    from pycr.migrate import throttle
    # The throttle first, without a freeze: a throttled tree is slow to reach its stops.
    for group in sorted({x.where for x in found if x.what == "throttle"}):
        if not throttle.release(group):
            raise PycrError(f"{group}: cannot move the tree out of pycr's throttle cgroup")
    if all(x.what == "throttle" for x in found):
        return found
    with freeze(root) as frozen:
        for pid, threads in frozen.processes.items():
            fds = [x.where for x in found if x.pid == pid and x.what == "userfaultfd"]
            if fds:
                from pycr.ptrace.inject import Injector
                with Injector(threads[0]) as inj:
                    for fd in fds:
                        res = inj.call("close", fd)
                        if res < 0:
                            raise PycrError(f"pid {pid}: close of fd {fd} failed ({-res})")
        for pid in frozen.processes:
            wipe_trampoline(pid)
            put_back_peek_offs(pid)
            if any(x.pid == pid and x.what == "tcp-repair" for x in found):
                tcp_in_repair(pid, undo=True)
            if any(x.pid == pid and x.what == "tcp-lock" for x in found):
                tcp_locked(pid, undo=True)
    return found
