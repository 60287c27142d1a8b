"""Lock an established TCP connection against incoming data while pycr reads it.

A socket in repair mode still receives and acknowledges what its peer sends:
bytes arriving after the receive queue was read would be acknowledged, then
lost with the killed socket. So before the queues are read pycr attaches to
the socket (through its own fd of it) a classic BPF filter that drops every
packet. tcp_v4_rcv/tcp_v6_rcv run the socket filter (tcp_filter) before the
segment is processed: a dropped segment is neither queued nor acknowledged,
and the peer sends it again later, to the same socket after a thaw or to the
restored one. The filter goes with the socket when the tree is killed, and
is detached where repair mode goes off again.

pycr's filter is `ld #SIGNATURE; ret #0`: the load changes nothing, it lets
pycr tell its own filter (one a SIGKILLed pycr left) from a program's.
SO_GET_FILTER gives back the instructions as they were attached.
"""

import ctypes
import errno
import os
import socket
import struct

from . import abi

SIGNATURE = 0x70796372          # "pycr"
INSTRUCTION = struct.Struct("=HBBI")    # struct sock_filter: code, jt, jf, k
PROGRAM = ((abi.BPF_LD_W_IMM, 0, 0, SIGNATURE), (abi.BPF_RET_K, 0, 0, 0))

_libc = ctypes.CDLL(None, use_errno=True)
_libc.getsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint)]


class ForeignFilter(Exception):
    """The socket has a filter pycr did not attach, or its filter is locked (SO_LOCK_FILTER)."""


def _get_filter(fd, count):
    buf = ctypes.create_string_buffer(max(count, 1) * INSTRUCTION.size)
    length = ctypes.c_uint(count)
    if _libc.getsockopt(fd, socket.SOL_SOCKET, abi.SO_GET_FILTER, buf if count else None, ctypes.byref(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return length.value, buf.raw


def filter_of(sock):
    """The classic filter attached to sock, as a tuple of (code, jt, jf, k); () if none.

    Raises ForeignFilter for an eBPF program (SO_ATTACH_BPF: SO_GET_FILTER gives EACCES)."""
    fd = sock.fileno()
    try:
        count, _ = _get_filter(fd, 0)        # optlen 0: the kernel answers the number of instructions
        if not count:
            return ()
        got, raw = _get_filter(fd, count)
    except OSError as exc:
        if exc.errno == errno.EACCES:
            raise ForeignFilter("an eBPF socket filter (SO_ATTACH_BPF)") from None
        raise
    return tuple(INSTRUCTION.unpack_from(raw, i * INSTRUCTION.size) for i in range(got))


def is_locked(sock):
    """Is pycr's filter on sock (it drops everything the peer sends)?"""
    try:
        return filter_of(sock) == PROGRAM
    except ForeignFilter:
        return False


def check_lockable(sock):
    """Raise ForeignFilter if attaching pycr's filter would replace or fail against the program's own."""
    prog = filter_of(sock)
    if prog and prog != PROGRAM:
        raise ForeignFilter(f"a socket filter of its own ({len(prog)} classic BPF instructions)")
    if sock.getsockopt(socket.SOL_SOCKET, abi.SO_LOCK_FILTER):
        raise ForeignFilter("a locked socket filter (SO_LOCK_FILTER)")


def lock(sock):
    """Attach the drop-everything filter (SO_ATTACH_FILTER, struct sock_fprog)."""
    code = b"".join(INSTRUCTION.pack(*insn) for insn in PROGRAM)
    buf = ctypes.create_string_buffer(code, len(code))
    sock.setsockopt(socket.SOL_SOCKET, abi.SO_ATTACH_FILTER,
                    struct.pack("=HxxxxxxQ", len(PROGRAM), ctypes.addressof(buf)))


def unlock(sock):
    """Detach pycr's filter; the peer's next retransmission gets through."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, abi.SO_DETACH_FILTER, 0)
    except OSError as exc:
        if exc.errno != errno.ENOENT:       # no filter any more
            raise
