"""TCP and UDP sockets (IPv4, IPv6): addresses, state and queues from sock_diag, options by getsockopt.

Each socket is looked at through pycr's own fd of it (`core.dup_from`) and
found in the kernel's inet_diag listing by its inode. Only options that apply
to the socket's family and type are asked, and only those that differ from a
new socket's are kept. A listener with connections waiting in its accept queue
is refused: they cannot be put back into a new listener's queue. An
ESTABLISHED connection needs --tcp-established: it is locked against incoming
data (pycr.tcp_lock) until the tree is killed or thawed, and read in TCP repair
mode (pycr.tcp_repair), which it leaves at once and enters again just before
the kill (it then closes without a FIN or RST). A connection with a socket filter
of the program's own is refused: the lock would replace it. Datagrams
queued on a UDP socket are not carried; -v says how much was left.

For `pycr migrate` on one host (options.current().socket_handover) nothing
is read but the socket's identity: the replica takes the source's very socket.
For `pycr migrate --to` (options.current().other_host) a connection over
loopback whose other end is outside the tree is refused before any is locked:
that end stays on this host, where the moved connection could never reach it.
"""

import ipaddress
import os
import socket
import stat as st

from .. import options
from ..abi import TCP_CLOSE, TCP_ESTABLISHED, TCP_LISTEN, TCP_STATES
from ..errors import Unsupported
from ..formats.inetsk import OPTIONS
from ..log import log
from ..native import core
from .. import tcp_lock, tcp_repair
from . import inet_diag

TYPE = "inetsk"
IMAGE = "inetsk"
KINDS = {(socket.SOCK_STREAM, socket.IPPROTO_TCP): "TCP", (socket.SOCK_DGRAM, socket.IPPROTO_UDP): "UDP"}
FAMILIES = {socket.AF_INET: "4", socket.AF_INET6: "6"}


def _socket_of(pid, fd):
    """A socket object over pycr's own fd of pid's fd (closing it closes only pycr's fd)."""
    return socket.socket(fileno=core.dup_from(pid, fd))


def matches(pid, fd, target, st_result):
    if not st.S_ISSOCK(st_result.st_mode):
        return False
    try:
        with _socket_of(pid, fd) as sock:
            return sock.family in FAMILIES and (sock.type, sock.proto) in KINDS
    except OSError:
        return False


def show(family, addr, port):
    """127.0.0.1:8000, [::1]:8000"""
    host = socket.inet_ntop(family, addr)
    return f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"


def _read_options(sock, family, kind):
    """{(level, name): bytes} of every option that applies to this family and kind."""
    want = FAMILIES[family]
    letter = "s" if kind == "TCP" else "u"
    got = {}
    for (level, name), (_label, families, kinds, size) in OPTIONS.items():
        if want in families and letter in kinds:
            try:
                got[(level, name)] = sock.getsockopt(level, name, size)
            except OSError:
                continue      # not in this kernel's build: a new socket will not have it either
    return got


_defaults = {}


def _changed_options(sock, family, kind):
    """The options whose value differs from a new socket's of the same family and kind."""
    key = (family, kind)
    if key not in _defaults:
        with socket.socket(family, sock.type, sock.proto) as fresh:
            _defaults[key] = _read_options(fresh, family, kind)
    default = _defaults[key]
    return [{"level": level, "name": name, "value": value}
            for (level, name), value in _read_options(sock, family, kind).items() if default.get((level, name)) != value]


def _address(family, addr, port, scope_id=0):
    return {"addr": addr, "port": port, "scope_id": scope_id}


def _scope(sock, family, which):
    if family != socket.AF_INET6:
        return 0
    try:
        return (sock.getsockname() if which == "local" else sock.getpeername())[3]
    except OSError:
        return 0


def _describe(held, sock, diag):
    pid, fd = held.pid, held.fd
    name = f"pid {pid} fd {fd}"
    family, kind = sock.family, KINDS[(sock.type, sock.proto)]
    inode = os.fstat(sock.fileno()).st_ino
    if (family, sock.proto) not in diag:
        diag[(family, sock.proto)] = inet_diag.sockets(family, sock.proto)
    d = diag[(family, sock.proto)].get(inode)
    if d is None:
        raise Unsupported(f"{name}: {kind} socket not found by sock_diag in pycr's network namespace")
    local, peer = show(family, d.src, d.sport), show(family, d.dst, d.dport)
    entry = {"file_id": held.file_id, "inode": inode, "family": int(family), "type": int(sock.type), "protocol": sock.proto,
             "state": d.state, "handover": False, "backlog": 0, "options": [], "tcp": [],
             "local": _address(family, d.src, d.sport, _scope(sock, family, "local")),
             "peer": _address(family, d.dst, d.dport, _scope(sock, family, "peer") if d.dport else 0)}
    if options.current().socket_handover:
        entry["handover"] = True
        log.info("%s: %s %s, state %s: handed over to the replica as it is", name, kind, local,
                 TCP_STATES.get(d.state, d.state))
        return entry, None
    entry["options"] = _changed_options(sock, family, kind)
    if kind == "UDP":
        if d.rqueue:
            log.info("%s: UDP %s: datagrams queued to read (%d bytes of receive memory) are not carried",
                     name, local, d.rqueue)
        return entry, None
    if d.state == TCP_LISTEN:
        if d.rqueue:
            raise Unsupported(f"{name}: listening TCP socket {local} has {d.rqueue} connection(s) waiting in its "
                              "accept queue, which cannot be brought back")
        entry["backlog"] = d.wqueue
        log.info("%s: TCP %s listening, backlog %d", name, local, d.wqueue)
        return entry, None
    if d.state == TCP_CLOSE:
        return entry, None
    if d.state != TCP_ESTABLISHED:
        raise Unsupported(f"{name}: TCP connection {local} <-> {peer} in state {TCP_STATES.get(d.state, d.state)} "
                          "is not supported")
    if not options.current().tcp_established:
        raise Unsupported(f"{name}: established TCP connection {local} <-> {peer} (dump with --tcp-established)")
    return entry, (name, local, peer)


def _read_established(entry, sock, name, local, peer):
    """Lock the connection (until kill or thaw), read its state in repair mode, leave repair mode."""
    reuse = next((int.from_bytes(o["value"], "little") for o in entry["options"]
                  if (o["level"], o["name"]) == (socket.SOL_SOCKET, socket.SO_REUSEADDR)), 0)
    try:
        tcp_lock.check_lockable(sock)
    except tcp_lock.ForeignFilter as exc:
        raise Unsupported(f"{name}: established TCP connection {local} <-> {peer} has {exc}, which pycr's "
                          "lock against incoming data would replace") from None
    already = tcp_repair.in_repair(sock)
    tcp_lock.lock(sock)
    tcp_repair.hold(sock, min(reuse, 1), f"{name} ({local} <-> {peer})")
    log.info("%s: TCP %s <-> %s locked: a socket filter drops what the peer sends, unacknowledged, "
             "until the thaw or the restore", name, local, peer)
    tcp_repair.repair_on(sock)
    if already:
        log.info("%s: was in TCP repair mode already (left by an earlier pycr?)", name)
    try:
        conn, problem = tcp_repair.read(sock)
    finally:
        if not already:     # locked, it waits out of repair mode (recv there fails with EPERM) until the kill
            tcp_repair.repair_off(sock, min(reuse, 1), probe=False)
    if problem:
        raise Unsupported(f"{name}: established TCP connection {local} <-> {peer}: {problem}")
    w = conn.window
    entry["tcp"] = [{"inq_seq": conn.inq_seq, "outq_seq": conn.outq_seq, "recv_data": conn.recv_data,
                     "send_data": conn.send_data, "unsent": conn.unsent, "mss_clamp": conn.mss_clamp,
                     "options": conn.options, "snd_wscale": conn.snd_wscale, "rcv_wscale": conn.rcv_wscale,
                     "timestamp": conn.timestamp, **dict(zip(tcp_repair.WINDOW_FIELDS, w))}]
    log.info("%s: TCP %s <-> %s in repair mode: rcv_nxt %d, write_seq %d, %d bytes to read, %d to send "
             "(%d never sent), mss %d, options %#x", name, local, peer, conn.inq_seq, conn.outq_seq,
             len(conn.recv_data), len(conn.send_data), conn.unsent, conn.mss_clamp, conn.options)


def _unlock_leftover(sock, held):
    """A pycr killed during an earlier dump may have left its filter: the connection drops everything."""
    if (sock.type, sock.proto) == (socket.SOCK_STREAM, socket.IPPROTO_TCP) and tcp_lock.is_locked(sock):
        tcp_lock.unlock(sock)
        log.info("pid %d fd %d: pycr's socket filter, left by an earlier pycr, detached", held.pid, held.fd)


def _ends(entry):
    return tuple((bytes(entry[side]["addr"]), entry[side]["port"]) for side in ("local", "peer"))


def _loopback(addr):
    ip = ipaddress.ip_address(addr)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def _refuse_stranded(described):
    """Moving to another host: a loopback connection needs its other end in the tree too."""
    ends = {_ends(entry) for _sock, entry, _established in described}
    for _sock, entry, established in described:
        if not established or not _loopback(bytes(entry["peer"]["addr"])):
            continue
        local, peer = _ends(entry)
        if (peer, local) not in ends:
            name, here, there = established
            raise Unsupported(f"{name}: established TCP connection {here} <-> {there}: its other end is a "
                              "process outside the tree on this host's loopback, which stays here: it cannot "
                              "follow the tree to another host")


def collect(objects):
    diag = {}
    socks, described = [], []
    try:
        for held in objects:
            sock = _socket_of(held.pid, held.fd)
            socks.append(sock)
            _unlock_leftover(sock, held)
            described.append((sock, *_describe(held, sock, diag)))
        if options.current().other_host:
            _refuse_stranded(described)
        for sock, entry, established in described:      # every socket is described before any is locked
            if established:
                _read_established(entry, sock, *established)
                socks.remove(sock)      # tcp_repair holds it until the tree is killed or thawed
    finally:
        for sock in socks:
            sock.close()
    return {"sockets": [entry for _sock, entry, _established in described]}
