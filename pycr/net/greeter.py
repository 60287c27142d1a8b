"""Connections to serve's port between migrations, greeted side by side.

serve runs one migration at a time, but greeting a peer (its hello, the TLS
handshake under --tls, the challenge and its first frame) takes up to the
frame timeout (PYCR_NET_TIMEOUT) of a peer that says nothing. Greeted one
after the other, a silent connection would keep the source that connects
next waiting that long. So each connection is greeted in a thread of its
own, with its own deadline (at most 16 at once, 4 from one address:
pycr.net.admission), and serve takes the first that proved the secret
and opened a migration. Any other that opens one while a migration runs is
told "busy"; a peer that fails is refused in one line, as before. Only
between migrations does this accept: during one, the listener belongs to the
migration (a redial with its VERDICT, the post-copy phase's newcomers). A
source that comes back (LAZY_RESUME) after its replica was killed is told so
(pycr.net.gone), in its greeting's thread.
"""

import os
import select
import signal
import threading

from ..errors import PycrError
from ..formats.wire import FrameType, Role
from ..log import log
from . import auth
from .admission import Admission
from .gone import tell


class Refused(PycrError):
    """A peer refused before any migration began (foreign, wrong secret, silent): no replica existed."""


class Greeter:
    """Greets every connection on `listener` while serve waits for a migration (next())."""

    def __init__(self, listener, creds, gone):
        self.listener, self.creds, self.gone = listener, creds, gone
        self._lock = threading.Lock()
        self._ended = []            # greetings over, oldest first: (channel, MIGRATION frame) or Refused
        self._greeting = Admission()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._serving = False

    def next(self):
        """The next source that proved the secret and opened a migration -> (channel, its MIGRATION
        frame); from then on, until done(), any other is told "busy". Raises Refused for a peer
        refused before one (in the order their greetings ended)."""
        self.listener.settimeout(None)
        while True:
            got = self._take()
            if got is not None:
                return got
            ready = select.select([self.listener, self._wake_r], [], [])[0]
            if self._wake_r in ready:
                while os.read(self._wake_r, 64) == 64:
                    pass
            if self.listener in ready:
                self._greet_next()

    def done(self):
        """The migration taken by next() is over: greet for the next one."""
        with self._lock:
            self._serving = False

    def _take(self):
        with self._lock:
            if not self._ended:
                return None
            got = self._ended.pop(0)
            if isinstance(got, Refused):
                raise got
            self._serving = True
            others = [e for e in self._ended if not isinstance(e, Refused)]
            self._ended = [e for e in self._ended if isinstance(e, Refused)]
        for chan, _ in others:
            _busy(chan)
        return got

    def _greet_next(self):
        chan = auth.accept(self.listener, self.creds)
        log.info("%s: connected", chan.name)
        full = self._greeting.admit(chan)
        if full is not None:
            log.warning("pycr serve: %s: refused at once: %s", chan.name, full)
            chan.close()
            return
        # the thread starts with every signal blocked: SIGINT and SIGTERM stay the main thread's
        was = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            threading.Thread(target=self._greet, args=(chan,), name="pycr-serve-greet", daemon=True).start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, was)

    def _greet(self, chan):
        ended = None
        try:
            chan.hello(Role.MIGRATE_DEST, {Role.MIGRATE_SOURCE})
            auth.server_handshake(chan, self.creds.secret)
            first = chan.recv(FrameType.MIGRATION, FrameType.VERDICT, FrameType.LAZY_RESUME)
            if first.type == FrameType.LAZY_RESUME:
                ended = self._resumed(chan, first)
            elif first.type == FrameType.VERDICT:
                chan.error("no migration is being settled here")
                chan.close()
                ended = Refused(f"{chan.name}: sent a VERDICT, but no migration is in doubt here")
            else:
                ended = (chan, first)
        except PycrError as exc:
            chan.close()
            ended = Refused(str(exc))
        self._greeting.release(chan)
        with self._lock:
            serving = self._serving and not isinstance(ended, Refused)
            if not serving and ended is not None:
                self._ended.append(ended)
        if serving and ended is not None:
            _busy(ended[0])
        os.write(self._wake_w, b"x")

    def _resumed(self, chan, first):
        """A source dialled again for its post-copy phase -> None once told its replica is gone, or
        Refused: no such migration is remembered here."""
        try:
            set_id = self.gone.take(first.body.id)
            if set_id is None:
                chan.error("no migration with this ID is in its post-copy phase here")
                return Refused(f"{chan.name}: resumes a migration this serve does not know")
            tell(chan, set_id)
            return None
        finally:
            chan.close()


def _busy(chan):
    log.warning("pycr serve: %s: opened a migration while another runs here: told busy", chan.name)
    try:
        chan.error("busy: another migration is running here")
    finally:
        chan.close()
