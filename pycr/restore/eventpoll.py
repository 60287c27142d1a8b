"""epoll: the set is made by pycr; each registration is added by the task that made it.

Registrations are keyed by the task's own fd numbers (the program's later
EPOLL_CTL_MOD/DEL name them), so each is added with an epoll_ctl injected
into the process the dump found holding that fd, once, even when the set is
shared by several processes. Readiness then comes back by itself: adding a
registration polls the file, whose state was restored before.

Two things a plain EPOLL_CTL_ADD would get wrong are put right from pycr's own
fd of the set, before any task runs:
- a fired EPOLLONESHOT registration is disarmed, which userspace reaches only
  by delivering it: it is added armed for every event and, if its file is
  ready, its event is taken with epoll_wait. A disarmed one whose file is ready
  for nothing stays armed for EPOLLERR|EPOLLHUP only (epoll_ctl always adds those);
- an edge-triggered registration that is ready is reported once after an ADD;
  if the set was idle at the dump, the program had consumed every edge, so the
  ready list is emptied with epoll_wait (level-triggered entries go back on it).
  In a set that was not idle the kernel does not say which entries were on its
  ready list: there a ready edge-triggered registration is reported once after
  the restore even if the program had already taken that edge.
"""

import ctypes
import os
import struct

from pycr import abi
from pycr.abi import NR
from pycr.errors import ImageError
from pycr.log import log
from pycr.native import core

TYPE = "eventpoll"
IMAGE = "eventpoll"
KNOWN = abi.EPOLL_ANY_EVENT | abi.EPOLL_PRIVATE_BITS
BATCH = 64


def check(path, body, recs):
    holders = {}
    for pid, rec in recs:
        holders.setdefault(rec.file_id, set()).add(pid)
    seen = set()
    for e in body.eventpolls:
        if e.file_id in seen or e.file_id not in holders:
            raise ImageError(path, f"corrupt: epoll {e.file_id} is listed twice or held by no fd")
        seen.add(e.file_id)
        for t in e.targets:
            if t.pid not in holders[e.file_id]:
                raise ImageError(path, f"corrupt: epoll {e.file_id} fd {t.tfd} belongs to pid {t.pid}, "
                                       "which does not hold the set")
            if t.events & ~KNOWN or (t.events & abi.EPOLLEXCLUSIVE and t.events & abi.EPOLLONESHOT):
                raise ImageError(path, f"corrupt: epoll {e.file_id} fd {t.tfd} has events {t.events:#x}")
    for pid, rec in recs:
        if rec.file_id not in seen:
            raise ImageError(path, f"corrupt: pid {pid} fd {rec.fd} has no eventpoll entry")


def disarmed(t):
    """A fired one-shot: the kernel left it only its flag bits."""
    return t.events & abi.EPOLLONESHOT and not t.events & ~abi.EPOLL_PRIVATE_BITS


def take_ready(fd):
    """epoll_wait(timeout 0) on pycr's fd of a set until it reports nothing: the data of what it took."""
    buf = ctypes.create_string_buffer(abi.EPOLL_EVENT_SIZE * BATCH)
    taken = []
    while True:
        n = core.syscall(NR["epoll_wait"], fd, ctypes.addressof(buf), BATCH, 0)
        taken += [struct.unpack_from("<IQ", buf, i * abi.EPOLL_EVENT_SIZE)[1] for i in range(n)]
        if n < BATCH:
            return taken


class Objects:
    def __init__(self, images, body):
        self.entries = {e.file_id: e for e in body.eventpolls}
        self.fds = {}               # file_id -> pycr's fd of the set (Descriptions closes it)

    def open(self, rec):
        fd = os.epoll_create1(os.O_CLOEXEC) if hasattr(os, "epoll_create1") else \
            core.syscall(NR["epoll_create1"], os.O_CLOEXEC)
        self.fds[rec.file_id] = fd
        return fd

    def in_task(self, remote, pid, recs):
        epfds = {}
        for rec in recs:
            epfds.setdefault(rec.file_id, rec.fd)
        for file_id, epfd in epfds.items():
            e = self.entries[file_id]
            mine = [t for t in e.targets if t.pid == pid]
            if not mine:
                continue
            self._add(remote, epfd, file_id, mine)
            if e.idle and any(t.events & abi.EPOLLET for t in e.targets):
                n = len(take_ready(self.fds[file_id]))
                log.info("epoll %d: idle at the dump, %d already-consumed event(s) taken off its ready list", file_id, n)
            log.info("pid %d fd %d: %d epoll registration(s) added", remote.pid, epfd, len(mine))

    def _add(self, remote, epfd, file_id, targets):
        fired = [t for t in targets if disarmed(t)]
        for t in fired:
            ctl(remote, abi.EPOLL_CTL_ADD, epfd, t.tfd, t.events | abi.EPOLL_ANY_EVENT, t.data)
        if fired:
            taken = take_ready(self.fds[file_id])
            for t in fired:
                if t.data in taken:
                    taken.remove(t.data)
                else:       # ready for nothing: as disarmed as epoll_ctl allows
                    ctl(remote, abi.EPOLL_CTL_MOD, epfd, t.tfd, t.events, t.data)
        for t in targets:
            if not disarmed(t):
                ctl(remote, abi.EPOLL_CTL_ADD, epfd, t.tfd, t.events, t.data)

    def close(self):
        self.fds.clear()


def ctl(remote, op, epfd, tfd, events, data):
    remote.reset_scratch()          # the struct is needed only during the call
    addr = remote.put(struct.pack("<IQ", events, data))
    remote.check("epoll_ctl", epfd, op, tfd, addr, what=f"{epfd}, {op}, {tfd}, {{{events:#x}, {data:#x}}}")
