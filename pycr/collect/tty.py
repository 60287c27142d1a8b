"""Pseudo-terminals: both sides of every pty of the tree, and a shell job's terminal.

Everything is asked of the kernel through pycr's own copy of a tree's fd
(pidfd_getfd): on a master, TCGETS2 and TIOCGWINSZ answer for the slave, and
TIOCGSID / TIOCGPGRP work from any process. Nothing is read from the
terminal: bytes queued in it cannot be copied without consuming them, so a
terminal holding any is refused by name. Sessions and foreground groups are
checked against the whole tree afterwards (`check_terminals`).
"""

import errno
import fcntl
import os
import re
import select
import stat as st
import struct

from .. import abi, options, proc, sysinfo
from ..errors import TaskGone, Unsupported
from ..native import core

TYPES = ("ptmx", "pts")
IMAGE = "tty"
PTS_DIR = "/dev/pts"
MASTER_PATHS = ("/dev/ptmx", "/dev/pts/ptmx")
TERMIOS = struct.Struct("<IIIIB19sII")       # struct termios2
WINSIZE = struct.Struct("<HHHH")
LOCKED_TERMIOS_SIZE = 36                      # struct termios (TIOCGLCKTRMIOS)


def matches(pid, fd, target, s):
    """ptmx for a master (it has /dev/ptmx's device number), pts for a slave (a pts major)."""
    if not st.S_ISCHR(s.st_mode):
        return None
    if s.st_rdev == sysinfo.ptmx_rdev():
        return "ptmx"
    if os.major(s.st_rdev) in sysinfo.pts_majors():
        return "pts"
    return None


def _int(fd, request):
    return struct.unpack("i", fcntl.ioctl(fd, request, b"\0" * 4))[0]


def _int_or_zero(fd, request):
    """An int ioctl that gives ENOTTY when the terminal has no such thing (no session)."""
    try:
        return _int(fd, request)
    except OSError as exc:
        if exc.errno == errno.ENOTTY:
            return 0
        raise


def _termios(fd):
    iflag, oflag, cflag, lflag, line, cc, ispeed, ospeed = TERMIOS.unpack(
        fcntl.ioctl(fd, abi.TCGETS2, b"\0" * abi.TERMIOS2_SIZE))
    return {"iflag": iflag, "oflag": oflag, "cflag": cflag, "lflag": lflag, "line": line, "cc": cc,
            "ispeed": ispeed, "ospeed": ospeed}


def _winsize(fd):
    rows, cols, xpixel, ypixel = WINSIZE.unpack(fcntl.ioctl(fd, abi.TIOCGWINSZ, b"\0" * WINSIZE.size))
    return {"rows": rows, "cols": cols, "xpixel": xpixel, "ypixel": ypixel}


def _refuse_queued(fd, held, name, side):
    """Bytes waiting in the terminal: refused by name (reading them would take them from the tree)."""
    waiting = _int(fd, abi.FIONREAD)
    outq = _int(fd, abi.TIOCOUTQ)
    if waiting or outq:
        raise Unsupported(f"pid {held.pid} fd {held.fd}: {name} holds {waiting or outq} queued bytes on its "
                          f"{side} side, which pycr cannot copy without consuming them: dump when it is drained")


def _slave_index(held, s):
    """N of /dev/pts/N, for a slave of the devpts mounted on /dev/pts (the one a restore opens)."""
    path = held.rec["path"]
    m = re.fullmatch(r"(.*)/(\d+)", path)
    try:
        pts_dev = os.stat(PTS_DIR).st_dev
    except OSError:
        pts_dev = None
    if not m or s.st_dev != pts_dev:
        raise Unsupported(f"pid {held.pid} fd {held.fd}: {path} is a pty of a devpts other than "
                          f"{PTS_DIR}: not supported")
    return int(m.group(2))


def _pty_record(index):
    return {"index": index, "inherited": False, "termios": None, "winsize": None, "packet": False,
            "locked": False, "exclusive": False, "other_closed": False, "sid": 0, "pgrp": 0,
            "_name": f"{PTS_DIR}/{index}", "_rdev": None, "_master": None, "_slaves": []}


def _read_master(pty, held, fd):
    if held.rec["path"] not in MASTER_PATHS:
        raise Unsupported(f"pid {held.pid} fd {held.fd}: pty master {held.rec['path']} is not "
                          f"{' or '.join(MASTER_PATHS)}: not supported")
    name = pty["_name"]
    _refuse_queued(fd, held, name, "master")
    locked = fcntl.ioctl(fd, abi.TIOCGLCKTRMIOS, b"\0" * LOCKED_TERMIOS_SIZE)
    if any(locked):
        raise Unsupported(f"pid {held.pid} fd {held.fd}: {name} has locked termios bits (TIOCSLCKTRMIOS): "
                          "not supported")
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    hup = any(ev & select.POLLHUP for _fd, ev in poller.poll(0))
    pty.update(termios=_termios(fd), winsize=_winsize(fd), packet=bool(_int(fd, abi.TIOCGPKT)),
               locked=bool(_int(fd, abi.TIOCGPTLCK)), other_closed=hup,
               sid=_int_or_zero(fd, abi.TIOCGSID), pgrp=_int_or_zero(fd, abi.TIOCGPGRP))


def collect(objects):
    """tty.img body: one pty per index, one file entry per description.

    A pts whose master the tree does not hold is a shell job's terminal with -j
    (check_terminals makes sure it is), and refused by name without it.
    """
    ptys, files = {}, []
    for held in objects:
        master = held.rec["type"] == "ptmx"
        try:
            s = proc.stat_fd(held.pid, held.fd)
        except TaskGone:
            raise TaskGone(held.pid, f"fd {held.fd} closed while frozen") from None
        mine = core.dup_from(held.pid, held.fd)
        try:
            index = _int(mine, abi.TIOCGPTN) if master else _slave_index(held, s)
            pty = ptys.setdefault(index, _pty_record(index))
            if master:
                pty["_master"] = held
                _read_master(pty, held, mine)
            else:
                pty["_slaves"].append(held)
                pty["_rdev"] = s.st_rdev
                if pty["termios"] is None:
                    pty["termios"], pty["winsize"] = _termios(mine), _winsize(mine)
                pty["exclusive"] = pty["exclusive"] or bool(_int(mine, abi.TIOCGEXCL))
        finally:
            os.close(mine)
        files.append({"file_id": held.file_id, "index": index, "master": master})
    for pty in ptys.values():
        if pty["_master"] is None:
            held = pty["_slaves"][0]
            if not options.current().shell_job:
                raise Unsupported(f"pid {held.pid} fd {held.fd}: {pty['_name']} is a terminal whose master is "
                                  "outside the tree: not supported (a shell job's terminal: dump with -j)")
            pty["inherited"] = True
            continue
        for held in pty["_slaves"]:
            mine = core.dup_from(held.pid, held.fd)
            try:
                _refuse_queued(mine, held, pty["_name"], "slave")
            finally:
                os.close(mine)
        if pty["_rdev"] is None:
            pty["_rdev"] = _rdev_of(pty["_name"])
    return {"ptys": [ptys[i] for i in sorted(ptys)], "files": files}


def _rdev_of(path):
    try:
        return os.stat(path).st_rdev
    except OSError:
        return None


def tty_nr_dev(tty_nr):
    """The device number that /proc/PID/stat's tty_nr encodes (the kernel's new_encode_dev)."""
    major = (tty_nr >> 8) & 0xFFF
    minor = (tty_nr & 0xFF) | ((tty_nr >> 12) & 0xFFF00)
    return os.makedev(major, minor)


def terminal_name(tty_nr):
    """/dev/pts/N for a pty, else the device numbers."""
    dev = tty_nr_dev(tty_nr)
    if os.major(dev) in sysinfo.pts_majors() and _rdev_of(f"{PTS_DIR}/{os.minor(dev)}") == dev:
        return f"{PTS_DIR}/{os.minor(dev)}"
    return f"terminal {os.major(dev)}:{os.minor(dev)}"


def _comm(pid):
    try:
        return proc.comm(pid)
    except TaskGone:
        return "?"


def check_terminals(pstree, bodies):
    """Check terminals against the tree's sessions and groups; drop collect's private fields.

    A session of the tree with a controlling terminal must have it among the
    tree's ptys (the tree holds the master), every live member must have it
    as its controlling terminal too (the restore gives it to the leader before
    it forks; members inherit it), and its foreground group must be one of
    the tree's. The terminal of a session outside the tree (a shell job, -j)
    is the one inherited pts; its foreground group is kept if it is the tree's.
    """
    body = bodies.get(IMAGE)
    ptys = body["ptys"] if body else []
    entries = pstree["processes"]
    in_tree = {e["pid"] for e in entries}
    groups = {e["pgid"] for e in entries} | {z["pgid"] for z in pstree["zombies"]}
    stats = {e["pid"]: proc.stat(e["pid"]) for e in entries}
    by_sid = {}
    for e in entries:
        by_sid.setdefault(e["sid"], []).append(e["pid"])
    claimed = set()
    for pty in ptys:
        name = pty["_name"]
        if pty["inherited"]:
            outside = [pid for pid in in_tree if stats[pid].session not in in_tree and stats[pid].tty_nr
                       and tty_nr_dev(stats[pid].tty_nr) == pty["_rdev"]]
            if not outside:
                held = pty["_slaves"][0]
                raise Unsupported(f"pid {held.pid} fd {held.fd}: {name}, whose master is outside the tree, is "
                                  "not the terminal of the shell job's session: not supported")
            fg = stats[outside[0]].tpgid
            pty["pgrp"] = fg if fg in groups else 0
            continue
        sid = pty["sid"]
        if not sid:
            continue
        if sid not in in_tree or stats[sid].session != sid:
            raise Unsupported(f"{name} is the controlling terminal of session {sid} ({_comm(sid)}), whose "
                              "leader is outside the tree: not supported")
        for pid in by_sid.get(sid, ()):
            if stats[pid].state in "ZX" and pid != sid:
                continue
            if stats[pid].tty_nr == 0 or tty_nr_dev(stats[pid].tty_nr) != pty["_rdev"]:
                raise Unsupported(f"pid {pid} ({stats[pid].comm}) is in session {sid} but does not have its "
                                  f"controlling terminal {name}: not supported")
        if pty["pgrp"] and pty["pgrp"] not in groups:
            raise Unsupported(f"{name}: its foreground process group {pty['pgrp']} has no process in the "
                              "tree: not supported")
        claimed.add(sid)
    for sid in by_sid:
        if sid in in_tree and sid not in claimed and stats[sid].tty_nr:
            raise Unsupported(f"session {sid} ({stats[sid].comm}) has {terminal_name(stats[sid].tty_nr)} as "
                              "controlling terminal, whose master is not held by the tree: not supported "
                              "(dump the process that holds the master too)")
    for pty in ptys:
        for key in [k for k in pty if k.startswith("_")]:
            del pty[key]
