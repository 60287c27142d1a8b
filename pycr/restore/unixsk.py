"""Unix sockets: made again in pycr, connected as dumped, refilled, then handed to the tasks.

All sockets of the image are made at once, in an order that lets each
connection be made the way the program made it: socketpair() for pairs
without names, bind() and listen(), connect() + accept() on the tree's own
listener for connections it accepted, connect() for clients still waiting in
a backlog (queue order), connect() for datagram sockets and (--ext-unix-sk)
for peers outside the tree. Queued data is then sent from the peer end
(datagram and record boundaries kept), before any task gets an fd. A peer
that had been closed is a socket of pycr's that sends the data and is closed.
"""

import errno
import os
import socket
import stat as st

from pycr.abi import SO_PASSSEC, SO_RCVBUFFORCE, SO_SNDBUFFORCE
from pycr.collect import unixdiag
from pycr.collect.skqueue import set_peek_off
from pycr.errors import ImageError, RestoreError
from pycr.restore import handover
from pycr.restore.kindparts import entries_by_file, ready_for_task
from pycr.log import log

TYPE = "unixsk"
IMAGE = "unixsk"
SOCK_TYPES = {"stream": socket.SOCK_STREAM, "dgram": socket.SOCK_DGRAM, "seqpacket": socket.SOCK_SEQPACKET}
NAME_MAX = 108                  # sizeof(sun_path)
TIMEO_MAX = 2**63 - 1


def describe_name(name):
    from pycr.collect.unixsk import describe_name as describe
    return describe(bytes(name))


def check(path, body, recs):
    entries_by_file(path, body.sockets, recs, "unix socket")
    by_ino = {}
    for e in body.sockets:
        if e.ino in by_ino:
            raise ImageError(path, f"corrupt: socket {e.ino} is listed twice")
        by_ino[e.ino] = e
    for e in body.sockets:
        where = f"corrupt: socket {e.ino}"
        if len(e.name) > NAME_MAX or len(e.ext_peer) > NAME_MAX or e.shutdown > 3 or e.peek_off < -1:
            raise ImageError(path, f"{where}: a name, shutdown or peek offset out of range")
        if max(e.rcvtimeo, e.sndtimeo) > TIMEO_MAX:
            raise ImageError(path, f"{where}: a timeout out of range")
        if (str(e.state) == "listen" and str(e.type) == "dgram") or (e.pending and str(e.state) != "listen"):
            raise ImageError(path, f"{where}: a listening datagram socket or a backlog without a listener")
        links = [e.peer, e.accepted_from, *e.pending, *(m.sender for m in e.queue)]
        if any(x and x not in by_ino for x in links):
            raise ImageError(path, f"{where}: names a socket the image does not have")
        if e.peer and (e.peer_gone or e.ext_peer):
            raise ImageError(path, f"{where}: a peer both in the tree and gone or outside")
        if e.peer and str(by_ino[e.peer].type) != str(e.type):
            raise ImageError(path, f"{where}: connected to a socket of another type")
        if str(e.type) != "dgram" and e.peer and by_ino[e.peer].peer != e.ino:
            raise ImageError(path, f"{where}: its peer is connected elsewhere")
        if e.accepted_from and (str(by_ino[e.accepted_from].state) != "listen" or e.name):
            raise ImageError(path, f"{where}: accepted from a socket that is not listening")
        if str(e.type) == "dgram" and e.peer and by_ino[e.peer].peer != e.ino and not by_ino[e.peer].name:
            raise ImageError(path, f"{where}: connected to an unnamed socket that is not connected back")
        for m in e.queue:
            if not m.sender and not e.peer_gone and (str(e.type) != "dgram" or e.peer or not e.name):
                raise ImageError(path, f"{where}: queued data with no socket to send it from")
            if m.sender and str(e.type) != "dgram" and m.sender != e.peer:
                raise ImageError(path, f"{where}: queued data sent by a socket other than its peer")


def _address(e):
    """What connect() and sendto() take for a socket's name."""
    name = bytes(e.name)
    if name[:1] != b"\0" and e.dir:
        return os.path.join(os.fsencode(e.dir), name)
    return name


class Objects:
    def __init__(self, images, body):
        self.entries = {e.ino: e for e in body.sockets}
        self.by_file = {e.file_id: e.ino for e in body.sockets}
        self.socks = {}         # ino -> socket of pycr, until handed over by open()
        self.partners = {}      # ino -> pycr's socket standing for a peer that was closed
        self.live_files = None
        try:
            if handover.active():
                held = handover.holders(images)
                for e in body.sockets:
                    self.socks[e.ino] = handover.take_over(held[e.file_id], e.ino, f"unix socket {e.ino}")
            else:
                self._make()
        except BaseException:
            self.close()
            raise

    # -- making

    def _make(self):
        entries = self.entries
        for e in entries.values():
            if e.ino in self.socks or e.accepted_from:
                continue
            kind = SOCK_TYPES[str(e.type)]
            peer = entries.get(e.peer)
            if peer is not None and peer.peer == e.ino and not peer.accepted_from:
                self.socks[e.ino], self.socks[peer.ino] = socket.socketpair(socket.AF_UNIX, kind)
                log.info("unix sockets %d and %d: socketpair(%s)", e.ino, peer.ino, e.type)
            elif e.peer_gone:
                self.socks[e.ino], self.partners[e.ino] = socket.socketpair(socket.AF_UNIX, kind)
            else:
                self.socks[e.ino] = socket.socket(socket.AF_UNIX, kind)
        for ino, sock in list(self.socks.items()):
            self._buffers(sock, entries[ino])
        for e in entries.values():
            if e.name and not e.accepted_from:
                self._bind(e)
            if str(e.state) == "listen":
                self.socks[e.ino].listen(e.backlog)
        for e in entries.values():
            if e.accepted_from:
                self._accept(e)
        for e in entries.values():
            for client in e.pending:
                self._connect(self.socks[client], self.entries[e.ino], f"unix socket {client}")
                log.info("unix socket %d: connected to %s, waiting in its backlog", client, describe_name(e.name))
        for e in entries.values():
            if str(e.type) == "dgram" and e.peer and entries[e.peer].peer != e.ino:
                self._connect(self.socks[e.ino], entries[e.peer], f"unix socket {e.ino}")
            if e.ext_peer:
                try:
                    self.socks[e.ino].connect(bytes(e.ext_peer))
                except OSError as exc:
                    raise RestoreError(f"unix socket {e.ino}: cannot connect again to "
                                       f"{describe_name(e.ext_peer)} outside the tree: {exc.strerror}") from None
                log.info("unix socket %d: connected again to %s outside the tree (--ext-unix-sk)",
                         e.ino, describe_name(e.ext_peer))
        for e in entries.values():
            self._refill(e)
        for e in entries.values():
            self._finish(e)
        for partner in self.partners.values():
            partner.close()         # the peer that was closed is closed again
        self.partners.clear()
        for e in entries.values():
            if e.deleted and e.name[:1] != b"\0":
                os.unlink(_address(e))
                log.info("unix socket %d: %s unlinked again (deleted after bind)", e.ino, describe_name(e.name))

    def _buffers(self, sock, e):
        for force, plain, value in ((SO_RCVBUFFORCE, socket.SO_RCVBUF, e.rcvbuf),
                                    (SO_SNDBUFFORCE, socket.SO_SNDBUF, e.sndbuf)):
            if not value or sock.getsockopt(socket.SOL_SOCKET, plain) == value:
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, value // 2)       # the kernel doubles it
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, plain, value // 2)

    def _bind(self, e):
        sock, name = self.socks[e.ino], bytes(e.name)
        if name[:1] == b"\0":
            try:
                sock.bind(name)
            except OSError as exc:
                raise RestoreError(f"unix socket {e.ino}: cannot bind {describe_name(name)}: {exc.strerror}"
                                   + (" (held by another socket)" if exc.errno == errno.EADDRINUSE else "")) from None
            return
        full = _address(e)
        self._remove_stale(e, full)
        here = os.open(".", os.O_PATH | os.O_CLOEXEC) if e.dir else None
        try:
            if e.dir:
                os.chdir(e.dir)                 # a relative name stays relative
            sock.bind(name)
        except OSError as exc:
            raise RestoreError(f"unix socket {e.ino}: cannot bind {os.fsdecode(full)}: {exc.strerror}") from None
        finally:
            if here is not None:
                os.fchdir(here)
                os.close(here)
        if not e.deleted:
            os.chown(full, e.uid, e.gid)
            os.chmod(full, e.mode)
        log.info("unix socket %d: bound to %s", e.ino, os.fsdecode(full))

    def _remove_stale(self, e, full):
        """A socket file no socket is bound to (left by the dumped tree) goes; anything else stays and refuses."""
        try:
            s = os.lstat(full)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise RestoreError(f"unix socket {e.ino}: {os.fsdecode(full)}: {exc.strerror}") from None
        if not st.S_ISSOCK(s.st_mode):
            raise RestoreError(f"unix socket {e.ino}: {os.fsdecode(full)} exists and is not a socket")
        if self.live_files is None:
            self.live_files = {(os.makedev(sk.vfs[0] >> 20, sk.vfs[0] & 0xFFFFF), sk.vfs[1]): sk.ino
                               for sk in unixdiag.all_unix_sockets().values() if sk.vfs}
        holder = self.live_files.get((s.st_dev, s.st_ino))
        if holder is not None:
            raise RestoreError(f"unix socket {e.ino}: {os.fsdecode(full)} is bound by a live socket "
                               f"(inode {holder})")
        os.unlink(full)
        log.info("unix socket %d: removed the stale socket file %s", e.ino, os.fsdecode(full))

    def _connect(self, sock, target, what):
        sock.setblocking(False)
        try:
            sock.connect(_address(target))
        except OSError as exc:
            raise RestoreError(f"{what}: cannot connect to {describe_name(target.name)}: {exc.strerror}") from None
        finally:
            sock.setblocking(True)

    def _accept(self, e):
        listener = self.entries[e.accepted_from]
        if e.peer:
            client = self.socks[e.peer]
        else:
            client = self.partners[e.ino] = socket.socket(socket.AF_UNIX, SOCK_TYPES[str(e.type)])
        self._connect(client, listener, f"unix socket {e.peer or e.ino}")
        self.socks[e.ino], _ = self.socks[listener.ino].accept()
        self._buffers(self.socks[e.ino], e)
        log.info("unix socket %d: accepted from %s", e.ino, describe_name(listener.name))

    # -- data and the rest of the state

    def _sender(self, e, msg):
        if msg.sender:
            return self.socks[msg.sender], self.entries[msg.sender].peer != e.ino
        if e.ino in self.partners:
            return self.partners[e.ino], False
        if e.peer and str(e.type) != "dgram":
            return self.socks[e.peer], False
        return None, True

    def _refill(self, e):
        if not e.queue:
            return
        spare = None
        try:
            for msg in e.queue:
                sender, by_name = self._sender(e, msg)
                if sender is None:
                    spare = spare or socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    sender = spare
                self._send(sender, bytes(msg.data), _address(e) if by_name else None, e)
        finally:
            if spare is not None:
                spare.close()
        log.info("unix socket %d: %d message(s), %d bytes queued again", e.ino, len(e.queue),
                 sum(len(m.data) for m in e.queue))

    @staticmethod
    def _send(sender, data, to, e):
        view = memoryview(data)
        try:
            while True:
                sent = sender.sendto(view, socket.MSG_DONTWAIT, to) if to else sender.send(view, socket.MSG_DONTWAIT)
                view = view[sent:]
                if not view or str(e.type) != "stream":
                    return
        except BlockingIOError:
            raise RestoreError(f"unix socket {e.ino}: its queued data does not fit its buffers "
                               f"({len(view)} bytes left)") from None
        except OSError as exc:
            raise RestoreError(f"unix socket {e.ino}: cannot queue its data again: {exc.strerror}") from None

    def _finish(self, e):
        sock = self.socks[e.ino]
        set_ = sock.setsockopt
        if e.rcvlowat > 1:
            set_(socket.SOL_SOCKET, socket.SO_RCVLOWAT, e.rcvlowat)
        for opt, usec in ((socket.SO_RCVTIMEO, e.rcvtimeo), (socket.SO_SNDTIMEO, e.sndtimeo)):
            if usec:
                set_(socket.SOL_SOCKET, opt, (usec // 1_000_000).to_bytes(8, "little", signed=True)
                     + (usec % 1_000_000).to_bytes(8, "little", signed=True))
        if e.passcred:
            set_(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if e.passsec:
            set_(socket.SOL_SOCKET, SO_PASSSEC, 1)
        if e.peek_off >= 0:
            set_peek_off(sock, e.peek_off)
        how = {1: socket.SHUT_RD, 2: socket.SHUT_WR, 3: socket.SHUT_RDWR}.get(e.shutdown & 3)
        if how is not None and (e.ino not in self.partners or str(e.type) == "dgram"):
            try:
                sock.shutdown(how)
            except OSError as exc:
                if exc.errno != errno.ENOTCONN:
                    raise RestoreError(f"unix socket {e.ino}: shutdown: {exc.strerror}") from None

    # -- handing over

    def open(self, rec):
        return ready_for_task(self.socks.pop(self.by_file[rec.file_id]).detach(), rec)

    def close(self):
        for sock in (*self.socks.values(), *self.partners.values()):
            sock.close()
        self.socks.clear()
        self.partners.clear()
