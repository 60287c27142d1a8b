"""Pseudo-terminals made again with their index, settings and session; a shell job's terminal.

devpts gives a new pty the lowest free index, so pycr gets index N back by
opening /dev/ptmx while holding every lower free one, and refuses by name if
N is taken (a program keeps /dev/pts/N by name). Every description of a pty
is opened at once, in pycr: the master, then each slave with O_NOCTTY, so
that the slave is unlocked only while pycr opens it. The controlling terminal
can only be given to a session leader, by itself, and is inherited at fork:
TIOCSCTTY is injected into the leader right after its setsid, before it forks
the session's other members. A shell job's terminal (-j) is pycr's stdin.

`pycr migrate` on one host cannot make the pty again: the frozen source holds
its index. The replica takes the source's own descriptions instead
(pycr.restore.handover: same index, same settings, nothing reopened). The
source's session still owns the terminal, so the replica's session leader
steals it (TIOCSCTTY with arg 1, CAP_SYS_ADMIN): the kernel clears it from
every task of the source's session (session_clear_tty), so the killed
source's leader later exits with no terminal and sends no SIGHUP (its
disassociate_ctty finds none). If the migration fails afterwards the source's
leader takes it back, with its foreground group, before the thaw; its other
members cannot: a process gets a controlling terminal only at fork or as a
session leader. Members of the replica's session are forked again once their
leader holds it (late_sessions' recreate), for the same reason.
"""

import fcntl
import os
import signal
import struct

from pycr import abi, options, pidwait, proc
from pycr.ptrace.inject import Injector
from pycr.restore import handover
from pycr.collect.tty import tty_nr_dev
from pycr.abi import O_ACCMODE, O_CLOEXEC, O_CREAT, O_EXCL, O_TRUNC
from pycr.errors import ImageError, RestoreError, TaskGone
from pycr.log import log

TYPES = ("ptmx", "pts")
IMAGE = "tty"
PTMX = "/dev/ptmx"
PTS_DIR = "/dev/pts"
INDEX_LIMIT = 1 << 20                   # devpts's NR_UNIX98_PTY_MAX
TERMIOS = struct.Struct("<IIIIB19sII")   # struct termios2
WINSIZE = struct.Struct("<HHHH")
STATUS_FLAGS = os.O_APPEND | os.O_NONBLOCK | os.O_ASYNC


def check(path, body, recs):
    ptys = {}
    for p in body.ptys:
        if p.index in ptys or p.index >= INDEX_LIMIT or p.pgrp < 0:
            raise ImageError(path, f"corrupt: pty {p.index} is listed twice, past {INDEX_LIMIT} or has "
                                   f"foreground group {p.pgrp}")
        if len(p.termios.cc) != 19:
            raise ImageError(path, f"corrupt: pty {p.index} has {len(p.termios.cc)} control characters, not 19")
        ptys[p.index] = p
    files, masters = {}, set()
    for f in body.files:
        if f.file_id in files or f.index not in ptys:
            raise ImageError(path, f"corrupt: tty description {f.file_id} is listed twice or names no pty")
        if f.master:
            if f.index in masters or ptys[f.index].inherited:
                raise ImageError(path, f"corrupt: pty {f.index} has two masters, or one and is inherited")
            masters.add(f.index)
        files[f.file_id] = f
    for p in ptys.values():
        if not p.inherited and p.index not in masters:
            raise ImageError(path, f"corrupt: pty {p.index} has no master and is not a shell job's terminal")
    for pid, rec in recs:
        f = files.get(rec.file_id)
        if f is None or f.master != (str(rec.type) == "ptmx"):
            raise ImageError(path, f"corrupt: pid {pid} fd {rec.fd} has no {rec.type} entry")
    if any(p.inherited for p in ptys.values()) and not options.current().shell_job:
        pid, rec = next((pid, rec) for pid, rec in recs if ptys[files[rec.file_id].index].inherited)
        raise RestoreError(f"pid {pid} fd {rec.fd} ran on the terminal of a shell job (dumped with -j): "
                           "restore with -j (--shell-job) to put it on pycr's terminal")


def _capable(pid):
    """Has pid CAP_SYS_ADMIN in its effective set (a TIOCSCTTY steal needs it)?"""
    return bool(proc.status(pid).cap_eff >> abi.CAP_SYS_ADMIN & 1)


def _kill_and_wait_exited(real, timeout=5.0):
    """Kill task `real` and wait until it has exited (a zombie or gone): its exit lets go of its terminal."""
    if not pidwait.kill_and_wait_exit(real, timeout):
        raise RestoreError(f"pid {real} was killed but did not exit within {timeout} s")


def _set_int(fd, request, value):
    fcntl.ioctl(fd, request, struct.pack("i", value))


def open_at_index(index, flags):
    """A master of /dev/pts/<index>: every lower free index is held open meanwhile,
    since devpts hands out the lowest free one."""
    name = f"{PTS_DIR}/{index}"
    if os.path.exists(name):
        raise RestoreError(f"{name} is in use: the restored pty needs that name back (programs keep it)")
    held = []
    try:
        while True:
            try:
                fd = os.open(PTMX, flags | os.O_NOCTTY | O_CLOEXEC)
            except OSError as exc:
                raise RestoreError(f"{PTMX}: cannot open a pty to reach {name}: {exc.strerror}") from None
            held.append(fd)
            got = struct.unpack("i", fcntl.ioctl(fd, abi.TIOCGPTN, b"\0" * 4))[0]
            if got == index:
                held.pop()
                log.info("%s: opened %s as index %d (holding %d lower free indexes meanwhile)",
                         name, PTMX, index, len(held))
                return fd
            if got > index:
                raise RestoreError(f"{name} is in use: the restored pty needs that name back (programs keep it)")
    finally:
        for fd in held:
            os.close(fd)


class Objects:
    def __init__(self, images, body):
        self.path = images.imgdir.path_of(IMAGE)
        self.images = images
        self.ptys = {p.index: p for p in body.ptys}
        self.files = {f.file_id: f for f in body.files}
        self.fds = {}           # file_id -> pycr's fd of that description
        self.slave = {}         # index -> a slave fd: for TIOCSCTTY in the session leader
        self.extra = []         # slaves pycr opened for itself
        self.recs = {}
        for p in images.processes:
            for rec in p.fds:
                if rec.file_id in self.files:
                    self.recs.setdefault(rec.file_id, rec)
        self._check_sessions(images)
        self.handover = handover.active()
        if self.handover:
            self._check_can_steal()
        try:
            for pty in self.ptys.values():
                if pty.inherited:
                    self._inherit(pty)
                elif self.handover:
                    self._take_over(pty)
                else:
                    self._make(pty)
        except BaseException:
            self.close()
            raise

    def _check_sessions(self, images):
        leaders = {p.pid for p in images.processes if p.sid == p.pid}
        groups = {p.pgid for p in images.processes} | {z.pgid for z in images.zombies}
        for pty in self.ptys.values():
            if (pty.sid and (pty.sid not in leaders or pty.inherited)) or (pty.pgrp and pty.pgrp not in groups):
                raise ImageError(self.path, f"corrupt: pty {pty.index}'s session {pty.sid} or foreground group "
                                            f"{pty.pgrp} is not one of the tree's")

    def _check_can_steal(self):
        for pty in self.ptys.values():
            if pty.sid and not pty.inherited and not _capable(os.getpid()):
                raise RestoreError(f"{PTS_DIR}/{pty.index} is the controlling terminal of session {pty.sid}: "
                                   "the replica takes it from the source with TIOCSCTTY steal, which needs "
                                   "CAP_SYS_ADMIN")

    def _take_over(self, pty):
        """Every description of the pty from the frozen source, each checked to be this pty:
        TIOCGPTN on the master, the device number of /dev/pts/N on a slave."""
        name = f"{PTS_DIR}/{pty.index}"
        holders = handover.holders(self.images)
        try:
            rdev = os.stat(name).st_rdev
        except OSError as exc:
            raise RestoreError(f"{name}: the source's pty is gone: {exc.strerror}") from None
        for master in (True, False):
            for fid in self._descriptions(pty.index, master):
                fd = handover.take_fd(holders[fid], f"pty {'master' if master else 'slave'} {name}")
                self.fds[fid] = fd
                same = (struct.unpack("i", fcntl.ioctl(fd, abi.TIOCGPTN, b"\0" * 4))[0] == pty.index
                        if master else os.fstat(fd).st_rdev == rdev)
                if not same:
                    pid, num = holders[fid]
                    raise RestoreError(f"pid {pid} fd {num}: the source's description is no longer {name}")
                if not master:
                    self.slave.setdefault(pty.index, fd)
        if pty.index not in self.slave:         # TIOCSCTTY on a master acts on its slave
            (master_id,) = self._descriptions(pty.index, True)
            self.slave[pty.index] = self.fds[master_id]

    def _descriptions(self, index, master):
        return [fid for fid, f in self.files.items() if f.index == index and f.master == master]

    def _make(self, pty):
        """The master at its index, its settings, every slave description, then exclusive mode and lock."""
        name = f"{PTS_DIR}/{pty.index}"
        (master_id,) = self._descriptions(pty.index, True)
        rec = self.recs[master_id]
        master = open_at_index(pty.index, rec.flags & O_ACCMODE)
        self.fds[master_id] = master
        fcntl.fcntl(master, fcntl.F_SETFL, rec.flags & STATUS_FLAGS)
        _set_int(master, abi.TIOCSPTLCK, 0)
        t = pty.termios
        fcntl.ioctl(master, abi.TCSETS2, TERMIOS.pack(t.iflag, t.oflag, t.cflag, t.lflag, t.line, bytes(t.cc),
                                                       t.ispeed, t.ospeed))
        w = pty.winsize
        fcntl.ioctl(master, abi.TIOCSWINSZ, WINSIZE.pack(w.rows, w.cols, w.xpixel, w.ypixel))
        if pty.packet:
            _set_int(master, abi.TIOCPKT, 1)
        for fid in self._descriptions(pty.index, False):
            srec = self.recs[fid]
            flags = (srec.flags & ~(O_CREAT | O_EXCL | O_TRUNC)) | os.O_NOCTTY | O_CLOEXEC
            try:
                self.fds[fid] = os.open(name, flags)
            except OSError as exc:
                raise RestoreError(f"{name}: cannot open the slave: {exc.strerror}") from None
            self.slave.setdefault(pty.index, self.fds[fid])
        if pty.exclusive and pty.index in self.slave:
            fcntl.ioctl(self.slave[pty.index], abi.TIOCEXCL)
        if pty.index not in self.slave and (pty.sid or pty.other_closed):
            # A controlling terminal with no slave open anywhere: pycr's slave stands in for the
            # leader's TIOCSCTTY, and its close at the end marks the pty as closed on that side.
            fd = os.open(name, os.O_RDWR | os.O_NOCTTY | O_CLOEXEC)
            self.extra.append(fd)
            self.slave[pty.index] = fd
        if pty.locked:
            _set_int(master, abi.TIOCSPTLCK, 1)
        log.info("%s: made again (termios, %dx%d window%s%s%s)", name, w.cols, w.rows,
                 ", packet mode" if pty.packet else "", ", exclusive" if pty.exclusive else "",
                 ", locked" if pty.locked else "")

    def _inherit(self, pty):
        """A shell job's terminal becomes pycr's stdin terminal, which must be pycr's controlling one:
        the tree joins pycr's session and inherits it."""
        fids = self._descriptions(pty.index, False)
        if not os.isatty(0):
            raise RestoreError(f"the tree ran on {PTS_DIR}/{pty.index}, a shell job's terminal: pycr's stdin "
                               "is not a terminal to put it on")
        ctty = proc.stat(os.getpid()).tty_nr
        if not ctty or tty_nr_dev(ctty) != os.fstat(0).st_rdev:
            raise RestoreError(f"the tree ran on {PTS_DIR}/{pty.index}, a shell job's terminal: pycr's stdin "
                               f"({os.ttyname(0)}) is not pycr's controlling terminal")
        for fid in fids:
            self.fds[fid] = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 0)
        log.info("%s of the shell job: its fds take pycr's terminal %s", f"{PTS_DIR}/{pty.index}",
                 os.ttyname(0))

    def open(self, rec):
        return fcntl.fcntl(self.fds[rec.file_id], fcntl.F_DUPFD_CLOEXEC, 0)

    # -- sessions
    def _in_task(self, remote, index, pidfd, what, request, arg=None, value=0):
        """ioctl(request) injected into a task on its own copy of pycr's slave fd of pty index;
        arg: an int passed by address, else value is passed as is."""
        got = remote.call("pidfd_getfd", pidfd, self.slave[index], 0)
        if got < 0:
            raise RestoreError(f"pid {remote.pid}: pidfd_getfd of {PTS_DIR}/{index} failed: {os.strerror(-got)}")
        try:
            if arg is None:
                remote.check("ioctl", got, request, value, what=f"{PTS_DIR}/{index}, {what}")
            else:
                with remote.inj.scratch(64) as buf:
                    remote.write(buf, struct.pack("i", arg))
                    remote.check("ioctl", got, request, buf, what=f"{PTS_DIR}/{index}, {what}")
        finally:
            remote.call("close", got)

    def in_session(self, remote, pid, pidfd):
        for pty in self.ptys.values():
            if pty.sid == pid and not pty.inherited:
                if self.handover:
                    self._steal(remote, pty, pidfd)
                    continue
                self._in_task(remote, pty.index, pidfd, "TIOCSCTTY", abi.TIOCSCTTY)
                log.info("pid %d: TIOCSCTTY: %s/%d is its session's controlling terminal again", pid, PTS_DIR,
                         pty.index)

    def _steal(self, remote, pty, pidfd):
        """TIOCSCTTY 1: the source's session loses the terminal, the replica's leader gets it;
        a failed migration gives it back (handover.give_back)."""
        self._in_task(remote, pty.index, pidfd, "TIOCSCTTY 1 (steal)", abi.TIOCSCTTY, value=1)
        real = remote.real
        handover.before_thaw(lambda frozen: self._give_back(frozen, pty, real))
        log.info("pid %d: TIOCSCTTY 1: %s/%d taken from the source's session %d (session_clear_tty: none of "
                 "its tasks has it now)", remote.pid, PTS_DIR, pty.index, pty.sid)

    def _give_back(self, frozen, pty, replica_leader):
        """The frozen source's leader takes its terminal back, and sets its foreground group.

        With CAP_SYS_ADMIN it steals it back (no signal anywhere); without, the
        replica's leader is killed first (its exit lets go of the terminal and
        hangs up only the replica's foreground group), then it is a plain TIOCSCTTY.
        """
        name = f"{PTS_DIR}/{pty.index}"
        threads = frozen.processes.get(pty.sid)
        if not threads:
            raise RestoreError(f"{name}: the source's session leader {pty.sid} is not frozen")
        steal = _capable(pty.sid)
        if not steal:
            _kill_and_wait_exited(replica_leader)
        own = self._leader_fd(pty)
        with Injector(threads[0]) as inj:
            with inj.scratch(256) as buf:
                fd = own
                if fd is None:
                    inj.write(buf + 64, os.fsencode(name) + b"\0")
                    fd = inj.check("openat", abi.AT_FDCWD, buf + 64, os.O_RDWR | os.O_NOCTTY | O_CLOEXEC, 0)
                try:
                    inj.check("ioctl", fd, abi.TIOCSCTTY, 1 if steal else 0)
                    if pty.pgrp:
                        inj.write(buf, struct.pack("i", pty.pgrp))
                        inj.check("ioctl", fd, abi.TIOCSPGRP, buf)
                finally:
                    if own is None:
                        inj.call("close", fd)
        log.info("pid %d: %s is its controlling terminal again%s (the other tasks of its session lost it)",
                 pty.sid, name, f", process group {pty.pgrp} in front" if pty.pgrp else "")

    def _leader_fd(self, pty):
        """An fd of the session leader on this pty (a master works too), else None."""
        leader = self.images.by_pid(pty.sid)
        for rec in leader.fds if leader is not None else ():
            f = self.files.get(rec.file_id)
            if f is not None and f.index == pty.index and str(rec.type) in TYPES:
                return rec.fd
        return None

    def sessions(self):
        return {pty.sid for pty in self.ptys.values() if pty.sid and not pty.inherited}

    def after_groups(self, tasks, pidfd):
        for pty in self.ptys.values():
            if pty.sid and pty.pgrp and not pty.inherited:
                self._in_task(tasks[pty.sid].remote, pty.index, pidfd, f"TIOCSPGRP {pty.pgrp}", abi.TIOCSPGRP,
                              pty.pgrp)
                log.info("pid %d: TIOCSPGRP: process group %d is the foreground of %s/%d", pty.sid, pty.pgrp,
                         PTS_DIR, pty.index)

    def late_sessions(self, tasks, pidfd, recreate=None):
        """The tree was forked before its ptys existed (incremental restore): each session leader
        takes its terminal now, then the other members of its session are forked again from
        their parents (recreate(pids)): members inherit a controlling terminal at fork only."""
        members = []
        for pty in self.ptys.values():
            if not pty.sid or pty.inherited:
                continue
            others = sorted(p.pid for p in self.images.processes if p.sid == pty.sid and p.pid != pty.sid)
            if others and recreate is None:
                raise RestoreError(f"session {pty.sid} on {PTS_DIR}/{pty.index} has other processes than its "
                                   f"leader (pid {others[0]}): they were forked before the terminal was made "
                                   "again and cannot inherit it; use dump and restore")
            self.in_session(tasks[pty.sid].remote, pty.sid, pidfd)
            members += others
        if members:
            recreate(members)
        self.after_groups(tasks, pidfd)

    def before_release(self, tasks):
        """A shell job that was in the foreground of its terminal is in the foreground of pycr's."""
        for pty in self.ptys.values():
            if pty.inherited and pty.pgrp and pty.pgrp in tasks:
                real = tasks[pty.pgrp].real
                old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
                try:
                    os.tcsetpgrp(0, real)
                except OSError as exc:
                    raise RestoreError(f"cannot make process group {pty.pgrp} the foreground of pycr's "
                                       f"terminal: {exc.strerror}") from None
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, old)
                log.info("process group %d (pid %d here) is the foreground of pycr's terminal", pty.pgrp, real)

    def close(self):
        for fd in list(self.fds.values()) + self.extra:
            os.close(fd)
        self.fds.clear()
        self.extra.clear()
        self.slave.clear()
