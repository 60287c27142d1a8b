"""The kernel's view of TCP and UDP sockets, asked through NETLINK_SOCK_DIAG (inet_diag).

One dump request per (family, protocol) lists every socket of pycr's network
namespace with its state, addresses, queues and inode; a socket of the tree is
found by the inode of its fd. For a listener, `rqueue` is the number of
connections waiting in its accept queue and `wqueue` its backlog (listen()'s
argument, capped by somaxconn); for other sockets they are the bytes queued to
read and to send.
"""

import os
import socket
import struct
from dataclasses import dataclass

from ..abi import NETLINK_SOCK_DIAG, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, SOCK_DIAG_BY_FAMILY

NLMSG_HDR = struct.Struct("=IHHII")                # len, type, flags, seq, pid
REQ_V2 = struct.Struct("=BBBxI")                    # family, protocol, ext, pad, states
SOCKID = struct.Struct(">HH16s16s") # sport, dport (big-endian), src, dst (then if and cookie, native)
SOCKID_SIZE = 48
MSG_HEAD = struct.Struct("=BBBB")                   # family, state, timer, retrans
MSG_TAIL = struct.Struct("=IIIII")                  # expires, rqueue, wqueue, uid, inode
ALL_STATES = 0xFFFFFFFF


@dataclass
class DiagSocket:
    family: int
    state: int
    src: bytes          # 4 or 16 bytes
    sport: int
    dst: bytes
    dport: int
    ifindex: int
    rqueue: int
    wqueue: int
    uid: int
    inode: int


def _request(family, protocol):
    body = REQ_V2.pack(family, protocol, 0, ALL_STATES) + bytes(SOCKID_SIZE)
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body


def _parse(payload):
    family, state, _timer, _retrans = MSG_HEAD.unpack_from(payload, 0)
    sport, dport, src, dst = SOCKID.unpack_from(payload, MSG_HEAD.size)
    ifindex, = struct.unpack_from("=I", payload, MSG_HEAD.size + 36)
    _exp, rqueue, wqueue, uid, inode = MSG_TAIL.unpack_from(payload, MSG_HEAD.size + SOCKID_SIZE)
    size = 4 if family == socket.AF_INET else 16
    return DiagSocket(family, state, src[:size], sport, dst[:size], dport, ifindex, rqueue, wqueue, uid, inode)


def sockets(family, protocol):
    """{inode: DiagSocket} of every socket of this family and protocol in pycr's network namespace."""
    nl = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
    found = {}
    try:
        nl.sendto(_request(family, protocol), (0, 0))
        while True:
            data = nl.recv(1 << 16)
            at = 0
            while at + NLMSG_HDR.size <= len(data):
                length, kind, _flags, _seq, _pid = NLMSG_HDR.unpack_from(data, at)
                if length < NLMSG_HDR.size:
                    return found
                payload = data[at + NLMSG_HDR.size: at + length]
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    err, = struct.unpack_from("=i", payload, 0)
                    if err:
                        raise OSError(-err, f"sock_diag: {os.strerror(-err)}")
                    return found
                if kind == SOCK_DIAG_BY_FAMILY:
                    s = _parse(payload)
                    found[s.inode] = s
                at += (length + 3) & ~3
    finally:
        nl.close()
