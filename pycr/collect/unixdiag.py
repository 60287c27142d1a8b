"""What the kernel says of unix sockets through NETLINK_SOCK_DIAG (unix_diag).

One dump request lists every unix socket of pycr's network namespace with
its name, bound file (VFS dev/inode), peer, pending connections (for a
listener: the inodes of the clients waiting in its backlog), queue lengths
and shutdown state. Plain socket module and struct: no dependency.
"""

import errno
import socket
import struct
from dataclasses import dataclass, field

from .. import abi
from ..errors import KernelFeatureMissing

NLMSGHDR = struct.Struct("=IHHII")           # len, type, flags, seq, pid
UNIX_DIAG_REQ = struct.Struct("=BBHIIIII")    # family, protocol, pad, states, ino, show, cookie[2]
UNIX_DIAG_MSG = struct.Struct("=BBBBIII")    # family, type, state, pad, ino, cookie[2]
NLATTR = struct.Struct("=HH")
SHOW_ALL = (abi.UDIAG_SHOW_NAME | abi.UDIAG_SHOW_VFS | abi.UDIAG_SHOW_PEER | abi.UDIAG_SHOW_ICONS
            | abi.UDIAG_SHOW_RQLEN)


@dataclass
class UnixSocket:
    """One unix socket as unix_diag reports it."""
    ino: int
    type: int                    # SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET
    state: int                   # TCP_ESTABLISHED, TCP_CLOSE or TCP_LISTEN
    cookie: int
    name: bytes = b""            # sun_path as bound: b"" unnamed, b"\\0..." abstract
    vfs: tuple = None            # (dev, ino) of the socket file, for a path name
    peer: int = None             # peer's inode; 0: a peer without one (closed, or not accepted yet); None: no peer
    icons: list = field(default_factory=list)    # a listener's pending clients, queue order
    rqueue: int = 0              # bytes queued to read (a listener: connections waiting)
    wqueue: int = 0              # bytes sent and not yet read by the peer (a listener: its backlog)
    shutdown: int = 0            # RCV_SHUTDOWN 1 | SEND_SHUTDOWN 2


def _attrs(data):
    at = 0
    while at + NLATTR.size <= len(data):
        length, kind = NLATTR.unpack_from(data, at)
        if length < NLATTR.size:
            break
        yield kind & 0x3FFF, data[at + NLATTR.size: at + length]
        at += (length + 3) & ~3


def _parse(payload):
    family, type_, state, _, ino, c0, c1 = UNIX_DIAG_MSG.unpack_from(payload)
    sk = UnixSocket(ino=ino, type=type_, state=state, cookie=c0 | (c1 << 32))
    for kind, value in _attrs(payload[UNIX_DIAG_MSG.size:]):
        if kind == abi.UNIX_DIAG_NAME:
            sk.name = bytes(value)
        elif kind == abi.UNIX_DIAG_VFS:
            ino_, dev = struct.unpack_from("=II", value)
            sk.vfs = (dev, ino_)
        elif kind == abi.UNIX_DIAG_PEER:
            sk.peer = struct.unpack_from("=I", value)[0]
        elif kind == abi.UNIX_DIAG_ICONS:
            sk.icons = list(struct.unpack(f"={len(value) // 4}I", value))
        elif kind == abi.UNIX_DIAG_RQLEN:
            sk.rqueue, sk.wqueue = struct.unpack_from("=II", value)
        elif kind == abi.UNIX_DIAG_SHUTDOWN:
            sk.shutdown = value[0]
    return sk


def all_unix_sockets():
    """{inode: UnixSocket} of every unix socket in pycr's network namespace."""
    try:
        nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, abi.NETLINK_SOCK_DIAG)
    except OSError as exc:
        raise KernelFeatureMissing("sock_diag", f"NETLINK_SOCK_DIAG: {exc.strerror}") from None
    with nl:
        req = UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0, SHOW_ALL, 0xFFFFFFFF, 0xFFFFFFFF)
        nl.sendall(NLMSGHDR.pack(NLMSGHDR.size + len(req), abi.SOCK_DIAG_BY_FAMILY,
                                 abi.NLM_F_REQUEST | abi.NLM_F_DUMP, 1, 0) + req)
        found = {}
        while True:
            data = nl.recv(1 << 20)
            at = 0
            while at + NLMSGHDR.size <= len(data):
                length, kind, _, _, _ = NLMSGHDR.unpack_from(data, at)
                body = data[at + NLMSGHDR.size: at + length]
                if kind == abi.NLMSG_DONE:
                    return found
                if kind == abi.NLMSG_ERROR:
                    err = -struct.unpack_from("=i", body)[0]
                    if err == errno.ENOENT or err == errno.EOPNOTSUPP:
                        raise KernelFeatureMissing("unix_diag", "the kernel has no unix_diag (CONFIG_UNIX_DIAG)")
                    raise OSError(err, f"unix_diag: {errno.errorcode.get(err, err)}")
                if kind == abi.SOCK_DIAG_BY_FAMILY:
                    sk = _parse(body)
                    found[sk.ino] = sk
                at += (length + 3) & ~3
