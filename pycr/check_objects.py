"""`pycr check` for the kernel objects: each mechanism their restore needs, tried for real.

A kind whose mechanism is missing still dumps; its restore stops with one
line naming the mechanism. These findings say so in advance.
"""

import ctypes
import fcntl
import os
import socket
import struct

from . import abi
from .abi import NR, TIOCGPTN
from .native import core

OBJECTS = "objects"


def _finding(name, ok, detail):
    from .check import Finding
    return Finding(name, ok, detail, OBJECTS)


def check_sock_diag():
    """The peer of a unix pair and the state of a TCP listener, as NETLINK_SOCK_DIAG reports them."""
    from .collect import inet_diag, unixdiag
    try:
        a, b = socket.socketpair()
        listener = socket.socket()
        with a, b, listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            unix = unixdiag.all_unix_sockets()
            tcp = inet_diag.sockets(socket.AF_INET, socket.IPPROTO_TCP)
            ino_a, ino_b, ino_l = (os.fstat(s.fileno()).st_ino for s in (a, b, listener))
            ok = (ino_a in unix and unix[ino_a].peer == ino_b and ino_l in tcp
                  and tcp[ino_l].state == abi.TCP_LISTEN)
    except Exception as exc:        # a kernel without sock_diag, or one that answers otherwise
        return _finding("sock_diag", False, str(exc))
    return _finding("sock_diag", ok, "unix peers and TCP states of sockets pycr made" if ok else
                    "the kernel's answer does not match the sockets pycr made")


def check_timerfd_ticks():
    """TFD_IOC_SET_TICKS, then a read gives the expirations set."""
    from .restore.timerfd import set_ticks
    fd = core.syscall(NR["timerfd_create"], abi.CLOCK_MONOTONIC, os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        set_ticks(fd, 3)
        got = struct.unpack("<Q", os.read(fd, 8))[0]
    except Exception as exc:
        return _finding("timerfd ticks", False, str(exc))
    finally:
        os.close(fd)
    return _finding("timerfd ticks", got == 3, f"TFD_IOC_SET_TICKS 3, read {got}")


def check_timer_ids():
    """PR_TIMER_CREATE_RESTORE_IDS: timer_create takes the ID asked for (Linux 6.17+)."""
    from .restore.timers import restore_ids_supported
    if not restore_ids_supported():
        return _finding("POSIX timer IDs", False, "no PR_TIMER_CREATE_RESTORE_IDS: IDs are walked with placeholders")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    want = 4242
    timer_id = ctypes.c_int(want)
    event = ctypes.create_string_buffer(struct.pack("<Qiii44x", 0, 0, abi.SIGEV_NONE, 0))   # a sigevent
    libc.prctl(abi.PR_TIMER_CREATE_RESTORE_IDS, abi.PR_TIMER_CREATE_RESTORE_IDS_ON, 0, 0, 0)
    try:
        core.syscall(NR["timer_create"], abi.CLOCK_MONOTONIC, ctypes.addressof(event),
                     ctypes.addressof(timer_id))
    except OSError as exc:
        return _finding("POSIX timer IDs", False, f"timer_create with ID {want}: {exc.strerror}")
    finally:
        libc.prctl(abi.PR_TIMER_CREATE_RESTORE_IDS, abi.PR_TIMER_CREATE_RESTORE_IDS_OFF, 0, 0, 0)
    core.syscall(NR["timer_delete"], timer_id.value)
    return _finding("POSIX timer IDs", timer_id.value == want, f"asked for timer {want}, got {timer_id.value}")


def check_pty():
    """A pty from /dev/ptmx: its index (TIOCGPTN) names the slave pycr then opens."""
    try:
        master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        return _finding("ptys", False, f"/dev/ptmx: {exc.strerror}")
    try:
        index = struct.unpack("I", fcntl.ioctl(master, TIOCGPTN, b"\0" * 4))[0]
        fcntl.ioctl(master, abi.TIOCSPTLCK, struct.pack("i", 0))
        slave = os.open(f"/dev/pts/{index}", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        os.close(slave)
    except OSError as exc:
        return _finding("ptys", False, exc.strerror)
    finally:
        os.close(master)
    return _finding("ptys", True, f"/dev/ptmx gave /dev/pts/{index}, which opens")


def check_shm_next_id():
    """/proc/sys/kernel/shm_next_id lets a restore choose a SysV segment's id (read here, never written)."""
    path = "/proc/sys/kernel/shm_next_id"
    if not os.path.exists(path):
        return _finding("SysV shm ids", False, f"no {path}: segments come back under new ids")
    return _finding("SysV shm ids", os.access(path, os.W_OK), f"{path} is there" +
                    ("" if os.access(path, os.W_OK) else ", not writable: segments come back under new ids"))


CHECKS = (check_sock_diag, check_timerfd_ticks, check_timer_ids, check_pty, check_shm_next_id)
