"""Connections to serve's port while a migration's post-copy phase runs, met off the pages' path.

After the commit the lazy-pages daemon of a migration (lazy/migration_link.py)
accepts on serve's listener: it is where the source dials again after a lost
link. Anyone else may connect there too. Reading a newcomer's hello, its
TLS handshake and its proof takes up to the frame timeout (PYCR_NET_TIMEOUT)
of a peer that says nothing; done by the fetcher thread, that would hold
every fault of the replica for as long. So one thread accepts, and each
newcomer gets a thread of its own, with its own deadline, for its hello,
the challenge and its first frame (at most 16 at once, 4 from one address:
pycr.net.admission). Only a connection that proved the secret
and named this migration (LAZY_RESUME) reaches the fetcher, through a pipe
it watches with the link (fd(), take()); any other is refused there, in one
line on serve's stderr, and an authenticated peer that names another
migration is told "busy".
"""

import contextlib
import os
import select
import socket
import threading

from ..formats.wire import FrameType, Role
from ..log import log
from ..net import auth, channel as ch
from ..net.admission import Admission

REFUSED = "lazy-pages: refused a connection on serve's port: %s"


class Newcomers:
    """Accepts on `listener` from start() to close(); the source's connections naming migration_id, with
    the hello and authentication done, come out of take()."""

    def __init__(self, listener, creds, migration_id):
        self.listener, self.creds, self.id = listener, creds, migration_id
        self._ready_r = self._ready_w = self._stop_r = self._stop_w = None
        self._lock = threading.Lock()
        self._pending = set()           # channels in their hello, each with its thread
        self._admission = Admission()   # how many at once, in all and from one address; more are closed
        self._arrived = []              # the source's, authenticated, oldest first
        self._closed = False
        self._thread = None

    def start(self):
        """Accept from now on (in the process that serves the pages: its pipes are made here)."""
        if self._thread is None and not self._closed:
            self._ready_r, self._ready_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
            self._thread = threading.Thread(target=self._accept_loop, name="pycr-serve-newcomers", daemon=True)
            self._thread.start()

    def fd(self):
        """Readable once the source's new connection is authenticated (None before start())."""
        return self._ready_r

    def take(self, timeout=0):
        """The source's newest authenticated connection (older ones closed), waiting up to timeout s
        -> Channel, or None."""
        if self._ready_r is None or not select.select([self._ready_r], [], [], timeout)[0]:
            return None
        with contextlib.suppress(BlockingIOError):
            os.read(self._ready_r, 512)
        with self._lock:
            arrived, self._arrived = self._arrived, []
        for old in arrived[:-1]:
            log.info("%s: superseded by the source's newer connection: closed", old.name)
            old.close()
        return arrived[-1] if arrived else None

    # ------------------------------------------------------------ the threads

    def _accept_loop(self):
        while True:
            ready = select.select([self.listener, self._stop_r], [], [])[0]
            if self._stop_r in ready:
                return
            self.listener.settimeout(0)         # readable: a connection is there (or was reset)
            try:
                chan = auth.accept(self.listener, self.creds)
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as exc:
                log.warning("lazy-pages: serve's port: accept: %s; no reconnection can be taken",
                            exc.strerror or exc)
                return
            crowded = self._admission.admit(chan)
            if crowded is not None:     # (the source dials again)
                log.warning(REFUSED, f"{chan.name}: {crowded}")
                chan.close()
                continue
            with self._lock:
                self._pending.add(chan)
            threading.Thread(target=self._greet, args=(chan,), name="pycr-serve-newcomer", daemon=True).start()

    def _greet(self, chan):
        """The newcomer's hello, proof and first frame, by its own deadlines (the frame timeout each)."""
        try:
            chan.hello(Role.MIGRATE_DEST, {Role.MIGRATE_SOURCE})
            auth.server_handshake(chan, self.creds.secret)
            frame = chan.recv(FrameType.LAZY_RESUME, FrameType.MIGRATION, FrameType.VERDICT)
            if frame.type != FrameType.LAZY_RESUME or bytes(frame.body.id) != self.id:
                chan.error("busy: the post-copy phase of another migration runs here")
                raise ch.ProtocolError(f"{chan.name}: not the source of this migration")
        except (ch.NetError, OSError, ValueError) as exc:
            self._admission.release(chan)
            with self._lock:
                self._pending.discard(chan)
                closed = self._closed
            if not closed:              # (once closed, close() said it)
                log.warning(REFUSED, exc if isinstance(exc, ch.NetError) else f"{chan.name}: {exc}")
            chan.close()
            return
        log.info("%s: authenticated, names this migration (LAZY_RESUME)", chan.name)
        self._admission.release(chan)
        with self._lock:                # (close() closes the pipe under it)
            self._pending.discard(chan)
            if not self._closed:
                self._arrived.append(chan)
                with contextlib.suppress(BlockingIOError):
                    os.write(self._ready_w, b"+")
                return
        chan.close()

    def close(self):
        """The migration's post-copy phase is over: no more accepts; newcomers still in their hello
        are closed (each said in one line), the source's unused connections too."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending, self._pending = list(self._pending), set()
            arrived, self._arrived = self._arrived, []
        if self._thread is not None:
            os.write(self._stop_w, b"x")
            self._thread.join(timeout=5)
        for chan in pending:
            log.warning(REFUSED, f"{chan.name}: still in its hello and authentication when the migration "
                                 "ended: closed")
            with contextlib.suppress(OSError):
                socket.socket.shutdown(chan.sock, socket.SHUT_RDWR)    # wakes its thread, which closes it
        for chan in arrived:
            chan.close()
        with self._lock:
            for fd in (self._ready_r, self._ready_w, self._stop_r, self._stop_w):
                if fd is not None:
                    os.close(fd)
            self._ready_r = self._ready_w = self._stop_r = self._stop_w = None
