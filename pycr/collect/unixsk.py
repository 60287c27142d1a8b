"""Unix sockets: names, connections, backlogs, options and queued data.

What each socket is comes from the kernel's unix_diag (collect/unixdiag.py);
options from getsockopt on pycr's own dup of the socket (pidfd_getfd); the
queued data from MSG_PEEK (collect/skqueue.py), so nothing is consumed. A
socket connected to one outside the tree is refused by name unless
--ext-unix-sk, when the restore connects it again to the same address.
"""

import os
import socket
import stat as st
import struct

from .. import abi, options, proc
from ..errors import Unsupported
from ..log import log
from ..native import core
from . import skqueue, unixdiag

TYPE = "unixsk"
IMAGE = "unixsk"
TYPE_NAMES = {socket.SOCK_STREAM: "stream", socket.SOCK_DGRAM: "dgram", socket.SOCK_SEQPACKET: "seqpacket"}
STATE_NAMES = {abi.TCP_ESTABLISHED: "established", abi.TCP_CLOSE: "close", abi.TCP_LISTEN: "listen"}


def matches(pid, fd, target, st_):
    if not st.S_ISSOCK(st_.st_mode):
        return False
    try:
        sock = socket.socket(fileno=core.dup_from(pid, fd))     # owns pycr's copy from here on
    except OSError:
        return False
    try:
        return sock.family == socket.AF_UNIX
    finally:
        sock.close()


def _ino(target):
    """The inode in a `socket:[N]` link."""
    return int(target[len("socket:["):-1])


def describe_name(name):
    """A socket address as a person reads it: a path, @abstract, or (unnamed)."""
    if not name:
        return "(unnamed)"
    if name[:1] == b"\0":
        return "@" + name[1:].decode(errors="backslashreplace")
    return name.decode(errors="backslashreplace")


def path_of(name):
    """The path of a path name as the kernel reports it (up to its NUL), else b""."""
    if not name or name[:1] == b"\0":
        return b""
    return name.split(b"\0", 1)[0]


def _kernel_dev(dev):
    """The kernel-internal dev_t unix_diag reports (major << 20 | minor) as a userspace one."""
    return os.makedev(dev >> 20, dev & 0xFFFFF)


def _file_of(pid, sk, path, who):
    """(dir, deleted, mode, uid, gid) of a path-bound socket's file."""
    vfs = (_kernel_dev(sk.vfs[0]), sk.vfs[1]) if sk.vfs else None
    relative = not path.startswith(b"/")
    base = os.fsencode(proc.cwd(pid)) if relative else b""
    full = os.path.join(base, path) if relative else path
    try:
        s = os.stat(full)
    except OSError:
        s = None
    if s is not None and st.S_ISSOCK(s.st_mode) and (s.st_dev, s.st_ino) == vfs:
        return os.fsdecode(base), False, st.S_IMODE(s.st_mode), s.st_uid, s.st_gid
    if relative:
        raise Unsupported(f"{who}: unix socket bound to relative path {path.decode(errors='replace')} "
                          "that is not there from the process's cwd")
    return "", True, 0, 0, 0


def _options(sock):
    def intopt(opt):
        return sock.getsockopt(socket.SOL_SOCKET, opt)

    def timeo(opt):
        sec, usec = struct.unpack("qq", sock.getsockopt(socket.SOL_SOCKET, opt, 16))
        return sec * 1_000_000 + usec
    return {"passcred": bool(intopt(socket.SO_PASSCRED)), "passsec": bool(intopt(abi.SO_PASSSEC)),
            "rcvbuf": intopt(socket.SO_RCVBUF), "sndbuf": intopt(socket.SO_SNDBUF),
            "rcvlowat": intopt(socket.SO_RCVLOWAT),
            "rcvtimeo": timeo(socket.SO_RCVTIMEO), "sndtimeo": timeo(socket.SO_SNDTIMEO)}


class Tree:
    """Every unix socket of pycr's network namespace, and which of them the tree holds."""

    def __init__(self, objects):
        self.all = unixdiag.all_unix_sockets()
        self.held = {}
        for held in objects:
            ino = _ino(held.rec["path"])
            if ino not in self.all:
                raise Unsupported(f"pid {held.pid} fd {held.fd}: unix socket {ino} is in another network "
                                  "namespace than pycr's")
            self.held[ino] = held
        self.listener_of = {c: sk.ino for sk in self.all.values() if sk.state == abi.TCP_LISTEN for c in sk.icons}
        names = {}
        for sk in self.all.values():
            if sk.name:
                names.setdefault(sk.name, []).append(sk)
        self.by_name = names

    def outside(self, who, peer_ino, name):
        """The address to connect to again for --ext-unix-sk, or Unsupported."""
        what = describe_name(name) if name else f"inode {peer_ino}"
        if not options.current().ext_unix_sk:
            raise Unsupported(f"{who}: unix socket connected to {what} outside the tree")
        if not name:
            raise Unsupported(f"{who}: unix socket connected to inode {peer_ino} outside the tree, which has no "
                              "name to connect to again")
        return name

    def inherited_name(self, sk):
        """The listener a connected socket got its name from by accept(), if any: (listener or None, inherited)."""
        if sk.state != abi.TCP_ESTABLISHED or sk.type == socket.SOCK_DGRAM or not sk.name:
            return None, False
        same = [o for o in self.by_name.get(sk.name, []) if o.ino != sk.ino and o.vfs == sk.vfs]
        listener = next((o for o in same if o.state == abi.TCP_LISTEN), None)
        return listener, bool(same)


def _connection(tree, who, sk):
    """peer, peer_gone, ext_peer of one socket (a client waiting in a listener's backlog has none)."""
    if sk.peer is None:
        return 0, False, b""
    if sk.peer:
        if sk.peer in tree.held:
            peer = tree.all[sk.peer]
            if sk.type == socket.SOCK_DGRAM and peer.peer != sk.ino and not peer.name:
                raise Unsupported(f"{who}: unix datagram socket connected to an unnamed one that is not "
                                  "connected back")
            return sk.peer, False, b""
        other = tree.all.get(sk.peer)
        return 0, False, tree.outside(who, sk.peer, other.name if other else b"")
    listener = tree.listener_of.get(sk.ino)
    if listener is None:
        return 0, True, b""                 # its peer was closed
    if sk.wqueue:
        raise Unsupported(f"{who}: unix socket sent {sk.wqueue} bytes on a connection not accepted yet")
    if listener in tree.held:
        return 0, False, b""
    return 0, False, tree.outside(who, listener, tree.all[listener].name)


def _senders(tree, who, sk, peer, entry, messages):
    """[{sender, data}]: which socket the restore sends each queued message from."""
    out = []
    for data, addr in messages:
        if sk.type != socket.SOCK_DGRAM:
            out.append({"sender": peer, "data": data})
            continue
        if addr:
            mine = [o.ino for o in tree.by_name.get(addr, []) if o.ino in tree.held]
            if not mine:
                raise Unsupported(f"{who}: unix socket has a datagram queued from {describe_name(addr)} "
                                  "outside the tree")
            if sk.peer not in (None, 0, mine[0]):
                raise Unsupported(f"{who}: unix socket has a datagram from {describe_name(addr)} queued "
                                  "before it connected elsewhere")
            out.append({"sender": mine[0], "data": data})
        elif peer and not tree.all[peer].name:
            out.append({"sender": peer, "data": data})
        elif entry["peer_gone"] or (sk.peer is None and entry["name"]):
            out.append({"sender": 0, "data": data})
        else:
            raise Unsupported(f"{who}: unix socket has a datagram queued from an unnamed socket that pycr "
                              "cannot send from again")
    return out


def _entry(tree, held, sk):
    who = f"pid {held.pid} fd {held.fd}"
    if sk.type not in TYPE_NAMES or sk.state not in STATE_NAMES:
        raise Unsupported(f"{who}: unix socket of type {sk.type} in state {sk.state} is not supported")
    entry = {"file_id": held.file_id, "ino": sk.ino, "type": TYPE_NAMES[sk.type], "state": STATE_NAMES[sk.state],
             "name": sk.name, "dir": "", "deleted": False, "mode": 0, "uid": 0, "gid": 0,
             "accepted_from": 0, "backlog": 0, "pending": [], "shutdown": sk.shutdown}
    listener, inherited = tree.inherited_name(sk)
    if inherited:
        entry["name"] = b""
        if listener is not None and listener.ino in tree.held:
            entry["accepted_from"] = listener.ino
        else:
            log.info("%s: accepted from a listener on %s outside the tree or closed: comes back unnamed",
                     who, describe_name(sk.name))
    path = path_of(entry["name"])
    if path:
        entry["name"] = path
        entry["dir"], entry["deleted"], entry["mode"], entry["uid"], entry["gid"] = \
            _file_of(held.pid, sk, path, who)
    if sk.state == abi.TCP_LISTEN:
        entry["backlog"] = sk.wqueue
        entry["pending"] = list(sk.icons)
        for client in sk.icons:
            if client not in tree.held:
                raise Unsupported(f"{who}: unix socket listening on {describe_name(sk.name)} has a connection "
                                  f"from inode {client} outside the tree waiting to be accepted")
    entry["peer"], entry["peer_gone"], entry["ext_peer"] = _connection(tree, who, sk)
    mine = core.dup_from(held.pid, held.fd)
    sock = socket.socket(fileno=mine)
    try:
        entry.update(_options(sock))
        recorded = skqueue.journaled(sk.ino, sk.cookie)
        entry["peek_off"] = recorded if recorded is not None else skqueue.get_peek_off(sock)
        # A listener's queue is its backlog; a stream socket never connected has none (recv: EINVAL).
        unqueued = sk.state == abi.TCP_LISTEN or (sk.type != socket.SOCK_DGRAM and sk.state != abi.TCP_ESTABLISHED)
        messages = [] if unqueued else skqueue.peek_queue(sock, sk, who)
    finally:
        sock.close()
    if messages and entry["ext_peer"] and sk.type != socket.SOCK_DGRAM:
        raise Unsupported(f"{who}: unix socket connected to {describe_name(entry['ext_peer'])} outside the tree "
                          f"has {sum(len(m[0]) for m in messages)} bytes queued that its peer cannot send again")
    entry["queue"] = _senders(tree, who, sk, entry["peer"], entry, messages)
    if entry["ext_peer"]:
        log.info("%s: connected to %s outside the tree: the restore connects it again (--ext-unix-sk)",
                 who, describe_name(entry["ext_peer"]))
    return entry


def collect(objects):
    tree = Tree(objects)
    entries = [_entry(tree, held, tree.all[_ino(held.rec["path"])]) for held in objects]
    return {"sockets": entries}
