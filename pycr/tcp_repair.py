"""TCP repair mode (tcp(7), TCP_REPAIR): read an established connection whole, make it again.

In repair mode a socket sends nothing: its queues can be peeked (MSG_PEEK on
the queue TCP_REPAIR_QUEUE selects), its sequence numbers read and set
(TCP_QUEUE_SEQ), a connect() makes it ESTABLISHED without a handshake, and a
close() drops it without FIN or RST. It needs CAP_NET_ADMIN and any state
but LISTEN. Turning it on also sets the socket's sk_reuse to "force", turning
it off clears it: SO_REUSEADDR is read before and set again after.

A dump holds the connections it read (`held`: pycr's copies), each locked
against incoming data (pycr.tcp_lock) from before the read until the tree is
killed or thawed. Repair mode is on only while a connection is read, and again
just before the kill (`repair_all`): a program whose pycr is SIGKILLed in
between finds its connection locked (its peer's data waits, unacknowledged),
not in repair mode, where recv() fails with EPERM. `FrozenTree.thaw` detaches
the lock (`leave_all`); `FrozenTree.kill` puts every connection in repair mode,
kills the tree, then closes pycr's copies (`close_all`), so the peer sees
nothing. What a SIGKILLed pycr leaves (a lock, or repair mode inside those
short windows) pycr.leftovers finds (SO_GET_FILTER gives the filter back,
getsockopt TCP_REPAIR the flag) and `pycr cleanup` undoes.
"""

import errno
import fcntl
import socket
import struct
from dataclasses import dataclass

from . import abi, tcp_lock
from .log import log

TCP = socket.IPPROTO_TCP
WINDOW = struct.Struct("=5I")       # struct tcp_repair_window: snd_wl1 snd_wnd max_window rcv_wnd rcv_wup
WINDOW_FIELDS = ("snd_wl1", "snd_wnd", "max_window", "rcv_wnd", "rcv_wup")
PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
FORCE = {socket.SO_SNDBUF: abi.SO_SNDBUFFORCE, socket.SO_RCVBUF: abi.SO_RCVBUFFORCE}


@dataclass
class Connection:
    """What a connection needs to be made again (see formats/inetsk.md, `tcp`)."""
    inq_seq: int            # rcv_nxt: the next byte expected from the peer
    outq_seq: int           # write_seq: the sequence number after the last byte queued to send
    recv_data: bytes        # received, not yet read by the program
    send_data: bytes        # written by the program, not yet acknowledged by the peer
    unsent: int             # of send_data, bytes never sent at all (its tail)
    mss_clamp: int
    options: int            # TCPI_OPT_* the connection negotiated
    snd_wscale: int
    rcv_wscale: int
    timestamp: int          # TCP_TIMESTAMP (the current TSval), if TCPI_OPT_TIMESTAMPS
    window: tuple           # tcp_repair_window


def _int(sock, level, name):
    return struct.unpack("i", sock.getsockopt(level, name, 4))[0]


def _set_int(sock, level, name, value):
    sock.setsockopt(level, name, struct.pack("i", value))


def _set_u32(sock, level, name, value):
    sock.setsockopt(level, name, struct.pack("I", value & 0xFFFFFFFF))


def _ioctl_int(sock, request):
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0]


def in_repair(sock):
    """Is this TCP socket in repair mode (tp->repair, read back by getsockopt TCP_REPAIR)?"""
    return _int(sock, TCP, abi.TCP_REPAIR) != 0


def repair_on(sock):
    _set_int(sock, TCP, abi.TCP_REPAIR, abi.TCP_REPAIR_ON)


def repair_off(sock, reuseaddr=0, probe=True):
    """Leave repair mode (the kernel sends a window probe unless probe=False) and give SO_REUSEADDR
    its value back."""
    _set_int(sock, TCP, abi.TCP_REPAIR, abi.TCP_REPAIR_OFF if probe else abi.TCP_REPAIR_OFF_NO_WP)
    if reuseaddr:
        _set_int(sock, socket.SOL_SOCKET, socket.SO_REUSEADDR, reuseaddr)


def _peek(sock, queue, length):
    _set_int(sock, TCP, abi.TCP_REPAIR_QUEUE, queue)
    seq = _int(sock, TCP, abi.TCP_QUEUE_SEQ) & 0xFFFFFFFF
    if not length:
        return seq, b""
    data = sock.recv(length + 1, PEEK)
    return seq, data


def read(sock):
    """The state of an established connection in repair mode -> (Connection, problem or None)."""
    info = sock.getsockopt(TCP, socket.TCP_INFO, 8)
    options, wscale = info[5], info[6]
    inq_len = _ioctl_int(sock, abi.SIOCINQ)
    outq_len = _ioctl_int(sock, abi.SIOCOUTQ)
    unsent = _ioctl_int(sock, abi.SIOCOUTQNSD)
    inq_seq, recv_data = _peek(sock, abi.TCP_RECV_QUEUE, inq_len)
    outq_seq, send_data = _peek(sock, abi.TCP_SEND_QUEUE, outq_len)
    _set_int(sock, TCP, abi.TCP_REPAIR_QUEUE, abi.TCP_NO_QUEUE)
    problem = None
    if len(recv_data) != inq_len or len(send_data) != outq_len:
        problem = (f"its queues hold {inq_len} bytes to read and {outq_len} to send, "
                   f"but {len(recv_data)} and {len(send_data)} could be peeked")
    timestamp = _int(sock, TCP, abi.TCP_TIMESTAMP) & 0xFFFFFFFF if options & abi.TCPI_OPT_TIMESTAMPS else 0
    conn = Connection(inq_seq=inq_seq, outq_seq=outq_seq, recv_data=recv_data, send_data=send_data,
                      unsent=min(unsent, outq_len), mss_clamp=_int(sock, TCP, socket.TCP_MAXSEG),
                      options=options, snd_wscale=wscale & 0xF, rcv_wscale=wscale >> 4, timestamp=timestamp,
                      window=WINDOW.unpack(sock.getsockopt(TCP, abi.TCP_REPAIR_WINDOW, WINDOW.size)))
    return conn, problem


def _send_all(sock, data, buffer):
    """Queue all of data without blocking: no ACK can free room in repair mode, and the peer
    may not read before the program runs. When the buffer (SO_SNDBUF, or SO_RCVBUF for the
    receive queue) is full, it is made larger with SO_*BUFFORCE (CAP_NET_ADMIN, as repair mode)."""
    view = memoryview(data)
    stuck = 0
    while view:
        try:
            view = view[sock.send(view, socket.MSG_DONTWAIT):]
            stuck = 0
            continue
        except (BlockingIOError, MemoryError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno not in (errno.EAGAIN, errno.ENOMEM):
                raise
        stuck += 1
        if stuck > 4:
            raise OSError(errno.ENOBUFS, f"{len(view)} queued bytes do not fit the socket buffer")
        size = _int(sock, socket.SOL_SOCKET, buffer)
        sock.setsockopt(socket.SOL_SOCKET, FORCE[buffer], size + 2 * len(view))   # the kernel doubles it


def _repair_options(conn):
    opts = []
    if conn.options & abi.TCPI_OPT_SACK:
        opts.append((abi.TCPOPT_SACK_PERM, 0))
    if conn.options & abi.TCPI_OPT_WSCALE:
        opts.append((abi.TCPOPT_WINDOW, conn.snd_wscale | conn.rcv_wscale << 16))
    if conn.options & abi.TCPI_OPT_TIMESTAMPS:
        opts.append((abi.TCPOPT_TIMESTAMP, 0))
    opts.append((abi.TCPOPT_MAXSEG, conn.mss_clamp))
    return b"".join(struct.pack("=II", code, value) for code, value in opts)


def make(sock, conn, local, peer, reuseaddr=0):
    """Make `sock` (a new TCP socket of pycr) the dumped connection local <-> peer.

    Nothing reaches the peer until repair mode goes off; then a window probe
    tells it we are back, and bytes that were never sent go out as usual.
    """
    repair_on(sock)
    _set_int(sock, TCP, abi.TCP_REPAIR_QUEUE, abi.TCP_RECV_QUEUE)
    _set_u32(sock, TCP, abi.TCP_QUEUE_SEQ, conn.inq_seq - len(conn.recv_data))
    _set_int(sock, TCP, abi.TCP_REPAIR_QUEUE, abi.TCP_SEND_QUEUE)
    _set_u32(sock, TCP, abi.TCP_QUEUE_SEQ, conn.outq_seq - len(conn.send_data))
    sock.bind(local)
    sock.connect(peer)              # repair mode: ESTABLISHED at once, no SYN
    sock.setsockopt(TCP, abi.TCP_REPAIR_OPTIONS, _repair_options(conn))
    if conn.options & abi.TCPI_OPT_TIMESTAMPS:
        _set_u32(sock, TCP, abi.TCP_TIMESTAMP, conn.timestamp)
    if conn.recv_data:
        _set_int(sock, TCP, abi.TCP_REPAIR_QUEUE, abi.TCP_RECV_QUEUE)
        _send_all(sock, conn.recv_data, socket.SO_RCVBUF)
    sent = len(conn.send_data) - conn.unsent
    if sent:
        _set_int(sock, TCP, abi.TCP_REPAIR_QUEUE, abi.TCP_SEND_QUEUE)
        _send_all(sock, conn.send_data[:sent], socket.SO_SNDBUF)      # counted as sent: the peer may acknowledge it
    sock.setsockopt(TCP, abi.TCP_REPAIR_WINDOW, WINDOW.pack(*conn.window))
    _set_int(sock, TCP, abi.TCP_REPAIR_QUEUE, abi.TCP_NO_QUEUE)
    repair_off(sock, reuseaddr)
    if conn.unsent:
        _send_all(sock, conn.send_data[sent:], socket.SO_SNDBUF)      # never sent: it goes out now as any write would


# -- connections a dump holds in repair mode until the tree is killed or thawed

held = []       # [(socket, SO_REUSEADDR before, name)], each locked by pycr.tcp_lock


def hold(sock, reuseaddr, name):
    held.append((sock, reuseaddr, name))


def leave_all():
    """The tree goes on: every held connection is unlocked (and out of repair mode), as it was."""
    while held:
        sock, reuseaddr, name = held.pop()
        try:
            if in_repair(sock):
                repair_off(sock, reuseaddr)
                log.info("%s: TCP repair mode off again", name)
        except OSError as exc:
            log.warning("warning: %s: could not leave TCP repair mode: %s", name, exc.strerror)
        try:
            tcp_lock.unlock(sock)
            log.info("%s: pycr's filter detached: what the peer sent meanwhile comes again", name)
        except OSError as exc:
            log.warning("warning: %s: could not detach pycr's socket filter: %s", name, exc.strerror)
        finally:
            sock.close()


def repair_all():
    """Just before the tree is killed: every held connection in repair mode, so its close sends nothing."""
    for sock, _reuse, name in held:
        repair_on(sock)
        log.info("%s: TCP repair mode on: the kill closes it without FIN or RST", name)


def close_all():
    """The tree is dead: closing pycr's copies drops the connections silently (repair mode: no FIN, no RST),
    their filters with them."""
    while held:
        sock, _reuse, name = held.pop()
        sock.close()
        log.info("%s: closed in repair mode, nothing sent to the peer", name)
