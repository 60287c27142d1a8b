"""TCP and UDP sockets: made again by pycr, bound, listening or connected, handed to the tasks.

Every socket is made in pycr when the first one is needed, listeners first: a
connection accepted from a listener shares its local port, and its repair-mode
bind (which forces reuse) must come after the listener's own bind. Options go
on before bind (IPV6_V6ONLY, SO_REUSEADDR and SO_REUSEPORT must). An
ESTABLISHED connection is made in TCP repair mode (pycr.tcp_repair): nothing is
sent until repair mode goes off, then a window probe tells the peer.

A socket handed over (`pycr migrate` on one host) is not made at all: pycr
takes the frozen source's own socket with pidfd_getfd, so the replica gets the
very same open file description (accept queue, connections and all).

A socket bound to one address (not 0.0.0.0 or ::) comes back only where that
address is: on another host (`pycr migrate --to`) it must have moved there
first. `check_here` asks this host before any task is created (bind of a probe
socket to the address, port 0), so a migration is refused at its first set.
"""

import errno
import fcntl
import os
import socket

from pycr import abi, options, tcp_repair
from pycr.errors import ImageError, RestoreError
from pycr.formats.inetsk import OPTIONS
from pycr.log import log
from pycr.restore import handover

TYPE = "inetsk"
IMAGE = "inetsk"
KINDS = {(socket.SOCK_STREAM, socket.IPPROTO_TCP): "TCP", (socket.SOCK_DGRAM, socket.IPPROTO_UDP): "UDP"}
ADDR_SIZE = {socket.AF_INET: 4, socket.AF_INET6: 16}
STATES = {"TCP": (abi.TCP_LISTEN, abi.TCP_CLOSE, abi.TCP_ESTABLISHED), "UDP": (abi.TCP_CLOSE, abi.TCP_ESTABLISHED)}
BACKLOG_MAX = 2**31 - 1
WSCALE_MAX = 14
BUFFERS = {socket.SO_SNDBUF: abi.SO_SNDBUFFORCE, socket.SO_RCVBUF: abi.SO_RCVBUFFORCE}


def _bad(path, s, why):
    return ImageError(path, f"corrupt: socket {s.file_id}: {why}")


def _check_address(path, s, a, what):
    if len(a.addr) != ADDR_SIZE[s.family] or a.port > 0xFFFF:
        raise _bad(path, s, f"{what} address of {len(a.addr)} bytes or port {a.port}")


def _check_socket(path, s):
    if s.family not in ADDR_SIZE or (s.type, s.protocol) not in KINDS:
        raise _bad(path, s, f"family {s.family}, type {s.type}, protocol {s.protocol} is not TCP or UDP over IP")
    kind = KINDS[(s.type, s.protocol)]
    _check_address(path, s, s.local, "local")
    _check_address(path, s, s.peer, "peer")
    if s.state not in STATES[kind] or s.backlog > BACKLOG_MAX:
        raise _bad(path, s, f"{kind} state {s.state} or backlog {s.backlog}")
    if s.handover:
        if not options.current().socket_handover:
            raise ImageError(path, f"socket {s.file_id} was handed over by `pycr migrate` on one host: "
                                   "this set can only finish that migration")
        return
    family = "4" if s.family == socket.AF_INET else "6"
    for o in s.options:
        known = OPTIONS.get((o.level, o.name))
        if known is None or family not in known[1] or ("s" if kind == "TCP" else "u") not in known[2] \
                or len(o.value) > known[3]:
            raise _bad(path, s, f"option {o.level}/{o.name} is not one pycr sets on a {kind} socket")
    established = kind == "TCP" and s.state == abi.TCP_ESTABLISHED
    if len(s.tcp) != (1 if established else 0):
        raise _bad(path, s, f"{len(s.tcp)} TCP repair records for state {s.state}")
    for t in s.tcp:
        if t.unsent > len(t.send_data) or t.snd_wscale > WSCALE_MAX or t.rcv_wscale > WSCALE_MAX \
                or not s.peer.port or not s.local.port:
            raise _bad(path, s, "TCP repair record out of range")


def check(path, body, recs):
    have = {}
    for s in body.sockets:
        if s.file_id in have:
            raise _bad(path, s, "listed twice")
        _check_socket(path, s)
        have[s.file_id] = s
    for pid, rec in recs:
        if rec.file_id not in have:
            raise ImageError(path, f"corrupt: pid {pid} fd {rec.fd} has no socket entry")


def _what(s):
    """listening TCP socket 10.0.0.1:80, established TCP connection A <-> B, UDP socket A"""
    kind = KINDS[(s.type, s.protocol)]
    local = show(s.family, s.local)
    if kind == "TCP" and s.state == abi.TCP_LISTEN:
        return f"listening TCP socket {local}"
    if kind == "TCP" and s.state == abi.TCP_ESTABLISHED:
        return f"established TCP connection {local} <-> {show(s.family, s.peer)}"
    return f"{kind} socket {local}"


NOT_HERE = (errno.EADDRNOTAVAIL, errno.ENODEV)


def _not_here(s):
    host = socket.inet_ntop(s.family, bytes(s.local.addr))
    follow = ("a connection follows its tree to another host only with its address" if s.tcp else
              "a socket bound to one address comes back only where that address is")
    return RestoreError(f"{_what(s)}: address {host} is not on this host ({follow})")


def check_here(body):
    """Every socket bound to one address finds that address on this host: RestoreError if not."""
    for s in body.sockets:
        if s.handover or not s.local.port or not any(bytes(s.local.addr)):
            continue
        probe = socket.socket(s.family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        host, _port, *rest = sockaddr(s.family, s.local)
        try:
            probe.bind((host, 0, *rest))
            log.info("%s: address %s is this host's (a probe socket bound to it)", _what(s), host)
        except OSError as exc:
            if exc.errno in NOT_HERE:
                raise _not_here(s) from None
        finally:
            probe.close()


def sockaddr(family, a):
    host = socket.inet_ntop(family, bytes(a.addr))
    return (host, a.port) if family == socket.AF_INET else (host, a.port, 0, a.scope_id)


def show(family, a):
    host = socket.inet_ntop(family, bytes(a.addr))
    return f"[{host}]:{a.port}" if family == socket.AF_INET6 else f"{host}:{a.port}"


def _set_option(sock, o):
    value = bytes(o.value)
    if o.name in BUFFERS and o.level == socket.SOL_SOCKET:
        half = int.from_bytes(value, "little") // 2        # the kernel doubles what it is given
        try:
            sock.setsockopt(socket.SOL_SOCKET, BUFFERS[o.name], half)   # past rmem_max/wmem_max (CAP_NET_ADMIN)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, o.name, half)
        return
    if OPTIONS[(o.level, o.name)][3] == 16:                 # a name: up to its NUL
        value = value.split(b"\0", 1)[0]
    sock.setsockopt(o.level, o.name, value)


def _reuseaddr(s):
    for o in s.options:
        if (o.level, o.name) == (socket.SOL_SOCKET, socket.SO_REUSEADDR):
            return min(int.from_bytes(bytes(o.value), "little"), 1)
    return 0


def make(s):
    """A new socket of pycr in the dumped state -> socket object."""
    kind = KINDS[(s.type, s.protocol)]
    local = show(s.family, s.local)
    sock = socket.socket(s.family, s.type | socket.SOCK_CLOEXEC, s.protocol)
    try:
        for o in s.options:
            _set_option(sock, o)
        if s.tcp:
            t = s.tcp[0]
            conn = tcp_repair.Connection(
                inq_seq=t.inq_seq, outq_seq=t.outq_seq, recv_data=bytes(t.recv_data), send_data=bytes(t.send_data),
                unsent=t.unsent, mss_clamp=t.mss_clamp, options=t.options, snd_wscale=t.snd_wscale,
                rcv_wscale=t.rcv_wscale, timestamp=t.timestamp,
                window=tuple(getattr(t, f) for f in tcp_repair.WINDOW_FIELDS))
            tcp_repair.make(sock, conn, sockaddr(s.family, s.local), sockaddr(s.family, s.peer), _reuseaddr(s))
            log.info("TCP %s <-> %s made again in repair mode: %d bytes to read, %d to send", local,
                     show(s.family, s.peer), len(conn.recv_data), len(conn.send_data))
            return sock
        if s.local.port:
            sock.bind(sockaddr(s.family, s.local))
        if s.state == abi.TCP_LISTEN:
            sock.listen(s.backlog)
            log.info("TCP %s listening again, backlog %d", local, s.backlog)
        elif kind == "UDP" and s.peer.port:
            sock.connect(sockaddr(s.family, s.peer))
            log.info("UDP %s connected again to %s", local, show(s.family, s.peer))
        return sock
    except OSError as exc:
        sock.close()
        if exc.errno in NOT_HERE and any(bytes(s.local.addr)):
            raise _not_here(s) from None
        peer = f" <-> {show(s.family, s.peer)}" if s.peer.port else ""
        raise RestoreError(f"{kind} socket {local}{peer}: cannot be made again: {exc.strerror}") from None


def _order(s):
    """Listeners, then other unconnected sockets, then connections."""
    return 0 if s.state == abi.TCP_LISTEN else 1 if s.state == abi.TCP_CLOSE else 2


class Objects:
    def __init__(self, images, body):
        holders = handover.holders(images)
        self.ready = {}
        try:
            for s in sorted(body.sockets, key=_order):
                self.ready[s.file_id] = (handover.take_over(holders[s.file_id], s.inode, f"socket {show(s.family, s.local)}")
                                         if s.handover else make(s))
        except BaseException:
            self.close()
            raise

    def open(self, rec):
        fd = self.ready.pop(rec.file_id).detach()
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, (flags & ~os.O_NONBLOCK) | (rec.flags & os.O_NONBLOCK))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def close(self):
        for sock in self.ready.values():
            sock.close()
        self.ready.clear()
