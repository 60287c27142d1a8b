"""A migration's post-copy pages travel over the migration's own connection.

`pycr migrate --to --mode post-copy|hybrid` ends with a lazy final set: its
private anonymous pages stay in the frozen source tree. The destination's
lazy-pages daemon (a child of `pycr serve`, lazy/child.py) gets them over
the connection the migration came on, already authenticated (and under TLS
when asked): it never connects to the source, so a firewall or NAT that lets
only source -> destination through is enough, and nothing is authenticated
twice. From the fork on, the child owns that connection (the TLS state is
its copy; serve's copy of the socket is closed without a word on it):

- serve's own words to the source (RUNNING once the replica runs; ERROR if
  its restore fails before the commit) go through a pipe to the child,
  which sends them between its page frames (ParentEnd);
- after the commit a lost link is won back by the source, which dials
  serve's listening address again and sends LAZY_RESUME with the
  migration's ID; the child accepts it on serve's listener (serve does not
  accept while one of its migrations runs), checks the hello, the secret and
  the ID, and goes on as any reconnection does (LAZY_OPEN resumed, with only
  the chunks still missing). Those checks run in threads of their own
  (lazy/newcomers.py), never in the fetcher's: a stranger that connects and
  says nothing cannot hold the replica's faults. The source's new
  connection is taken even while the old link still looks open: a link cut
  silently (no FIN, no RST) is noticed by the source, whose sends stop, and
  its new connection tells the destination (which also gives the link up
  when the source is silent for the frame timeout with pages still to come:
  lazy/remote.py);
- at the end the child sends LAZY_DONE (its figures) itself.
"""

import contextlib
import json
import os
import select
import time

from .. import settings
from ..formats.wire import FrameType
from ..log import log
from ..net import channel as ch
from .newcomers import Newcomers

ACCEPT_SLICE = 1.0      # s of one wait for the source; the fetcher's reconnect loop calls again until its window ends


class MigrationLink:
    """The dialer (see remote.SourceDialer) of a migration's lazy-pages daemon."""

    def __init__(self, channel, listener, creds, migration_id):
        self.channel = channel          # the migration's, authenticated
        # serve's listener, where the source dials again after a lost link: accepted on after the commit
        self.newcomers = Newcomers(listener, creds, migration_id)
        self._ctl_r, self._ctl_w = os.pipe2(os.O_CLOEXEC)
        self._pending = b""
        self._first = True
        self.running = None             # the RUNNING body serve gave, and whether this channel carried it
        self.running_sent = False
        self.told_error = False
        self.parent_end = None
        self._next = None               # the source's new connection, accepted while the old link looked open

    # ------------------------------------------------------------ both sides of the fork

    def in_parent(self):
        """serve's side: its copy of the connection closed -> the ParentEnd it talks through."""
        os.close(self._ctl_r)
        name = self.channel.name
        self.channel.close()            # a close of this process's fd: no FIN, no TLS alert
        self.parent_end = ParentEnd(self._ctl_w, name)
        return self.parent_end

    def in_child(self):
        os.close(self._ctl_w)

    # ------------------------------------------------------------ the dialer (in the child)

    def connect(self, resumed):
        if self._first:
            self._first = False
            return self.channel
        chan, self._next = self._next, None
        if chan is None:
            self.newcomers.start()      # (a reconnection comes only after the commit)
            chan = self.newcomers.take(ACCEPT_SLICE)
        if chan is None:
            raise ch.PeerLost(f"no connection from the source within {ACCEPT_SLICE:g} s")
        log.info("%s: the source came back (LAZY_RESUME)", chan.name)
        self.channel = chan
        self.running_sent = False
        return chan

    def rejoined(self, channel):
        if self.running is not None:    # it may have been lost with the old link
            channel.send(FrameType.RUNNING, self.running)
            self.running_sent = True

    def fds(self, committed):
        # after the commit, the source's new connections too: one supersedes the link
        if committed:
            self.newcomers.start()
        return ([self._ctl_r] if self._ctl_r is not None else []) + ([self.newcomers.fd()] if committed else [])

    def on_ready(self, channel, ready):
        """serve wrote: send what it says -> None, or the reason the restore failed (ERROR sent).
        The source connected again: raises PeerLost, and connect() gives the new connection."""
        if self.newcomers.fd() in ready:
            newer = self.newcomers.take()
            if newer is not None:
                if self._next is not None:
                    self._next.close()
                self._next = newer
            if self._next is not None:
                raise ch.PeerLost(f"{channel.name}: the source connected again (its sends on this link "
                                  "stopped): the link is given up")
        if self._ctl_r is None or self._ctl_r not in ready:
            return None
        data = os.read(self._ctl_r, 65536)
        if not data:                    # serve closed its end
            os.close(self._ctl_r)
            self._ctl_r = None
        self._pending += data
        while b"\n" in self._pending:
            line, self._pending = self._pending.split(b"\n", 1)
            msg = json.loads(line)
            if msg["op"] == "running":
                self.running = msg["body"]
                channel.send(FrameType.RUNNING, self.running)
                self.running_sent = True
            elif msg["op"] == "error":
                channel.error(msg["message"])
                self.told_error = True
                return f"the restore failed: {msg['message']}"
        return None

    def release(self, channel):
        """The fetcher is done with it: kept for finish()."""

    def untold_advice(self):
        """What becomes of a source that did not hear its replica is gone (net/gone.py)."""
        return ": serve tells it when it connects again within its window, else it stays stopped there"

    def finish(self, figures, committed):
        """The daemon ended (figures: what child.py reports): after the commit, RUNNING if serve's came
        late, then LAZY_DONE; then the connection closes."""
        try:
            if (committed and not self.told_error and self.channel.broken is None
                    and self.channel.sock.fileno() != -1):      # (the fetcher closes a link it lost)
                deadline = time.monotonic() + settings.net_timeouts()[0]
                while self.running is None and self._ctl_r is not None and time.monotonic() < deadline:
                    if select.select([self._ctl_r], [], [], deadline - time.monotonic())[0]:
                        self.on_ready(self.channel, [self._ctl_r])
                    # (on_ready sent it)
                if self.running is not None and not self.running_sent:
                    self.channel.send(FrameType.RUNNING, self.running)
                error = figures.get("error", "")
                self.channel.send(FrameType.LAZY_DONE, {
                    "ok": int(not error), "faults": figures.get("faults", 0),
                    "fault_pages": figures.get("fault_pages", 0), "pushed_pages": figures.get("pushed_pages", 0),
                    "zero_pages": figures.get("zero_pages", 0), "seconds_us": int(figures.get("seconds", 0) * 1e6),
                    "median_ns": int(figures.get("median_us", 0) * 1000),
                    "p99_ns": int(figures.get("p99_us", 0) * 1000), "bytes": figures.get("bytes", 0),
                    "message": error})
            elif figures.get("error") and not self.told_error:
                # before the commit: the source is told why, and thaws its tree (a closed connection
                # alone would say only that the destination went away)
                self.channel.error(f"the lazy-pages daemon failed: {figures['error']}")
        except ch.NetError as exc:
            log.warning("lazy-pages: the source was not told the end: %s", exc)
        finally:
            self.channel.close()
            self.newcomers.close()
            if self._next is not None:
                self._next.close()
                self._next = None
            if self._ctl_r is not None:
                os.close(self._ctl_r)
                self._ctl_r = None


class ParentEnd:
    """What serve holds of the migration's connection once its lazy-pages daemon owns it: the few
    frames serve sends, handed to the daemon, which sends them."""

    def __init__(self, fd, name):
        self.fd, self.name = fd, name
        self.broken = None

    def _put(self, msg):
        if self.fd is None:
            raise ch.PeerLost(f"{self.name}: the lazy-pages daemon holding the connection has ended")
        try:
            os.write(self.fd, json.dumps(msg).encode() + b"\n")
        except OSError as exc:
            raise ch.PeerLost(f"{self.name}: the lazy-pages daemon holding the connection has ended "
                              f"({exc.strerror})") from None

    def send(self, ftype, body=None, **_):
        if ftype != FrameType.RUNNING:
            raise ch.ProtocolError(f"{self.name}: serve sends only RUNNING once the daemon has the link")
        self._put({"op": "running", "body": dict(body)})

    def error(self, message, linger=2.0):
        with contextlib.suppress(ch.NetError):
            self._put({"op": "error", "message": str(message)[:4000]})

    def close(self):
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
