"""RemotePages: the PageSource of `pycr lazy-pages --page-server`: pages fetched from a lazy dump's source.

Each process's pages file is a memfd of the size the manifest records
(the set copied from the source holds it as a hole). A fetcher thread owns
the channel to the source (lazy/remote_source.py): it turns the fault
server's requests (a fault waits for a chunk not yet there: faults.c writes
(file, chunk) on a pipe) into PAGE_REQUEST frames, which the source sends
before its background stream; it checks every PAGE_CHUNK's CRC-32C before
writing it to its memfd and marking it there (the C server checks the sum
again as it reads it, and places nothing unverified). Chunks are asked for
once: a chunk there stays there, and pages placed are never asked again.

How the channel is had is the dialer's business: SourceDialer connects to
the lazy dump's address and port (`lazy-pages --page-server`); a migration's
destination uses the migration's own connection instead (lazy/migration_link.py).

The source commits at RESUMING (resuming(), just before the replica runs).
A link lost before that fails the restore (nothing lost: the source thaws).
A link is lost when it breaks, and also when the source sends nothing for
the frame timeout (PYCR_NET_TIMEOUT) while chunks are still to come: it
pushes every wanted chunk without pause, so that silence is a link cut
without a FIN or a reset, which would otherwise hold the faults for good.
After the commit, the replica still needs the source: the fetcher says so in one
line and reconnects for PYCR_LAZY_RECONNECT seconds (default 30), asking
again for what it had asked; if the source never answers, the fault server
is stopped, the daemon fails, and its watchdog kills the replica, which
never runs on pages it does not have.
"""

import contextlib
import os
import struct
import threading
import time
from array import array

from .. import manifest
from ..errors import ImageError, PycrError
from ..formats import wire
from ..formats.wire import FrameType, Role
from ..images import ImageDir
from ..log import log
from ..native.core import FaultServer, crc32c
from ..net import auth, channel as ch
from ..restore.lazy import lazy_ranges
from ..restore.memory import PageChain
from .remote_source import reconnect_window
from .source import PageSource

REQUEST = struct.Struct("<II")
REPLICA_GONE_PATIENCE = 10.0     # s for the source to thaw its tree once told the replica is gone


class RemotePages(PageSource):
    """Pages of a lazy dump's image set, from its source at address:port."""

    chunk = wire.LAZY_CHUNK

    def __init__(self, images_dir, address=None, port=None, creds=None, chain_ok=False, dialer=None):
        # dialer.connect(resumed) -> an authenticated Channel to the source (see SourceDialer)
        self.dialer = dialer or SourceDialer(address, port, creds)
        chain = manifest.verify_chain(images_dir, deep=False)
        if len(chain) != 1 and not chain_ok:
            raise ImageError(images_dir, "a lazy dump with a parent set: not supported")
        # Of a chain (the final set of `migrate --mode hybrid`) only this set's own runs are
        # served: the parents' pages are in the replica already and are never asked for.
        imgdir = ImageDir(images_dir)
        if str(imgdir.read("inventory").kind) != "lazy-dump":
            raise ImageError(images_dir, "not a lazy dump (dump --lazy-pages): its pages are here; serve it "
                                         "with `pycr lazy-pages` without --page-server")
        man = chain[0][1]
        self.set_id = bytes(man.set_id).hex()
        self.pages = PageChain(imgdir)
        sizes = {e.name: e.size for e in man.files}
        self.pids = [p.pid for p in imgdir.read("pstree").processes]
        self._files, self._index, self.wanted = [], {}, {}
        self.server = None
        self.channel = None
        self.error = None
        self.committed = self.killed = False
        self._ended = None              # ALL_PLACED or REPLICA_GONE once sent: the source's end is due
        self._send_lock = threading.Lock()
        self._answers = {FrameType.RESUMING_OK: threading.Event(), FrameType.TREE_KILLED: threading.Event(),
                         FrameType.SOURCE_THAWED: threading.Event()}
        self._asked = set()
        self._unanswered = set()        # asked for and not yet landed
        self.received = self.pushed_bytes = self.requested = 0
        self._first = self._last = None
        self._req_r, self._req_w = os.pipe2(os.O_CLOEXEC)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._arrived = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stop = False
        self._thread = None
        try:
            for pid in self.pids:
                size = sizes.get(os.path.basename(self.pages.dirs[0].pages_path(str(pid))))
                if size is None:
                    continue
                fd = os.memfd_create(f"pycr-lazy-{pid}", os.MFD_CLOEXEC)
                os.ftruncate(fd, size)
                self._index[pid] = len(self._files)
                self._files.append((fd, size, array("I", bytes(4 * -(-size // self.chunk)))))
                self.wanted[pid] = self._wanted(imgdir, pid, -(-size // self.chunk))
            self._to_come = sum(bin(b).count("1") for bits in self.wanted.values() for b in bits)
        except BaseException:
            self.close()
            raise

    def _wanted(self, imgdir, pid, nchunks):
        """The chunks of pid's pages file that its lazy ranges need, as a bitmap."""
        bits = bytearray(-(-nchunks // 8))
        for start, end, _ in lazy_ranges(imgdir.read("mm", str(pid)), self.pages, str(pid)):
            for level, _addr, length, offset in self.pages.pieces(str(pid), start, end):
                if level:
                    continue
                for i in range(offset // self.chunk, (offset + length - 1) // self.chunk + 1):
                    bits[i // 8] |= 1 << (i % 8)
        return bits

    # ------------------------------------------------------------ PageSource

    def files(self):
        return list(self._files)

    def runs(self, pid, ranges):
        if pid not in self._index:
            raise ImageError(self.pages.dirs[0].path, f"pid {pid} has no pages in this image set")
        out = []
        for start, end, wipe in ranges:
            flags = FaultServer.WIPEONFORK if wipe else 0
            for level, addr, length, offset in self.pages.pieces(str(pid), start, end):
                if level:
                    continue
                out.append((addr, length, self._index[pid], offset, flags))
        out.sort()
        return out

    def remote(self):
        return (self._req_w, self._arrived)

    def attach(self, server):
        """The server exists: connect (before any task is restored) and start fetching."""
        self.server = server
        self.channel = self._connect(resumed=False)
        self._thread = threading.Thread(target=self._run, name="pycr-lazy-fetch", daemon=True)
        self._thread.start()

    def resuming(self):
        """The commit point, just before the replica runs: the source must confirm it."""
        self._call(FrameType.RESUMING, FrameType.RESUMING_OK)
        self.committed = True

    def finished(self):
        """Every page is placed: the source kills its tree."""
        with contextlib.suppress(PycrError):
            self._call(FrameType.ALL_PLACED, FrameType.TREE_KILLED, patience=2 * reconnect_window() + 10)
            return
        log.warning("lazy-pages: the source did not confirm it killed its tree; it leaves it stopped")

    def replica_gone(self):
        """The watchdog killed the replica and saw every task exit: tell the source (REPLICA_GONE),
        which runs its tree again: it is the one whole copy (docs/design.md, "Lazy restore").
        -> whether the source heard it."""
        try:
            self._call(FrameType.REPLICA_GONE, FrameType.SOURCE_THAWED, patience=REPLICA_GONE_PATIENCE)
        except PycrError as exc:
            log.warning("lazy-pages: the replica is dead, but the source could not be told to run its tree "
                        "again (%s)%s", exc, self.dialer.untold_advice())
            return False
        log.warning("lazy-pages: the replica was killed; the source runs its tree again")
        return True

    def failure(self):
        return self.error

    def summary(self):
        span = (self._last - self._first) if self._first is not None and self._last else 0.0
        rate = self.pushed_bytes / span / (1 << 20) if span > 0 else 0.0
        asked = (f"{self.requested} chunk{'s' if self.requested != 1 else ''} fetched ahead of the push "
                 "for faults" if self.requested else "every fault found its chunk already pushed")
        return (f"; {self.received / (1 << 20):.1f} MiB from the source ({asked}), "
                f"background push {rate:.1f} MiB/s")

    # ------------------------------------------------------------ the channel

    def _connect(self, resumed):
        channel = self.dialer.connect(resumed)
        try:
            wanted = [{"pid": pid, "bitmap": self._still_wanted(pid)} for pid in self.wanted]
            channel.send(FrameType.LAZY_OPEN, {"set_id": bytes.fromhex(self.set_id), "resumed": int(resumed),
                                               "wanted": wanted})
            ready = channel.recv(FrameType.LAZY_READY, idle=True)
            if ready.body.chunk_size != self.chunk:
                raise ch.ProtocolError(f"{channel.name}: sends chunks of {ready.body.chunk_size} bytes, not "
                                       f"{self.chunk}")
            if self._ended is not None:     # the end was said on the lost link: said again
                channel.send(self._ended, {})
            for pid, index in sorted(self._asked):          # asked before the link broke
                if self._ended is None and not self._there(pid, index):
                    channel.send(FrameType.PAGE_REQUEST, {"pid": pid, "index": index})
            if resumed:
                self.dialer.rejoined(channel)
        except BaseException:
            channel.close()
            raise
        return channel

    def _still_wanted(self, pid):
        bits = bytearray(self.wanted[pid])
        for i in range(len(bits) * 8):
            if bits[i // 8] >> (i % 8) & 1 and self.server is not None and self._there(pid, i):
                bits[i // 8] &= ~(1 << (i % 8))
        return bytes(bits)

    def _there(self, pid, index):
        return self.server.there(self._index[pid], index)

    def _call(self, ftype, answer, patience=None):
        event = self._answers[answer]
        with self._send_lock:
            if self.channel is None:
                raise PycrError("lazy-pages: no link to the source")
            try:
                self.channel.send(ftype, {})
            except ch.NetError as exc:
                raise PycrError(f"lazy-pages: {exc}") from None
            if ftype in (FrameType.ALL_PLACED, FrameType.REPLICA_GONE):
                self._ended = ftype     # the source's last word is due: no PAGE_REQUEST may follow
        if not event.wait(patience or self.channel.frame_timeout):
            raise PycrError(f"lazy-pages: the source did not answer {ftype.name}"
                            + (f": {self.error}" if self.error else ""))

    def _run(self):
        while not self._stop:
            try:
                self._pump()
                return
            except (ch.NetError, OSError) as exc:
                if self._stop or self.killed:
                    return
                reason = str(exc) if isinstance(exc, ch.NetError) else (exc.strerror or str(exc))
                if not self.committed:
                    self._fail(f"lost the source before the replica ran: {reason}")
                    return
                window = reconnect_window()
                log.warning("lazy-pages: lost the source (%s); the replica waits for its missing pages; "
                            "reconnecting for up to %g s", reason, window)
                if not self._reconnect(window):
                    self._fail(f"the source did not come back within {window:g} s ({reason}): the replica "
                               "cannot get its pages")
                    return

    def _reconnect(self, window):
        deadline = time.monotonic() + window
        with self._send_lock:
            self.channel.close()
            self.channel = None
        while time.monotonic() < deadline and not self._stop:
            try:
                channel = self._connect(resumed=True)
            except (ch.NetError, OSError):
                time.sleep(0.2)
                continue
            with self._send_lock:
                self.channel = channel
            log.warning("lazy-pages: reconnected to the source")
            return True
        return False

    def _fail(self, message):
        self.error = message
        log.warning("lazy-pages: %s", message)
        for event in self._answers.values():
            event.set()
        if self.server is not None:
            self.server.stop()

    def _pump(self):
        channel = self.channel
        heard = time.monotonic()
        while not self._stop:
            extra = self.dialer.fds(self.committed)
            # chunks still to come: once committed the source streams them without pause, and before
            # it answers what a fault asked for, so a silence then is a lost link (before the commit,
            # with no fault waiting, the source has nothing to send)
            expecting = self._to_come and (self.committed or self._unanswered)
            patience = max(0.0, heard + channel.frame_timeout - time.monotonic()) if expecting else None
            ready = ch.ready([channel, self._req_r, self._wake_r, *extra], patience)
            if channel in ready:
                heard = time.monotonic()
            elif expecting and time.monotonic() - heard >= channel.frame_timeout:
                raise ch.PeerLost(f"{channel.name}: sent nothing for {channel.frame_timeout:g} s while "
                                  f"{self._to_come} chunks were still to come: the link is given up")
            if any(fd in ready for fd in extra):      # first: what the dialer has to say goes out before an end
                with self._send_lock:
                    why = self.dialer.on_ready(channel, ready)
                if why is not None:             # the restore failed here and the source was told
                    self.killed = True
                    self._fail(why)
                    return
            if self._wake_r in ready:
                return
            if self._req_r in ready:
                data = os.read(self._req_r, REQUEST.size * 512)
                for file, index in REQUEST.iter_unpack(data):
                    pid = self.pids_of_file[file]
                    with self._send_lock:
                        if self._ended is not None or self._there(pid, index):
                            # the fault's chunk landed while its request sat in the pipe (its
                            # fault is served from it), or every page is placed and ALL_PLACED
                            # went: the source takes nothing after that but its end
                            continue
                        if not self._unanswered:
                            heard = time.monotonic()        # the answer is due from now
                        self._asked.add((pid, index))
                        self._unanswered.add((pid, index))
                        self.requested += 1
                        channel.send(FrameType.PAGE_REQUEST, {"pid": pid, "index": index})
            if channel in ready:
                frame = channel.recv(FrameType.PAGE_CHUNK, FrameType.RESUMING_OK, FrameType.TREE_KILLED,
                                     FrameType.SOURCE_THAWED)
                if frame.type == FrameType.PAGE_CHUNK:
                    self._landed(channel, frame.body)
                else:
                    if frame.type in (FrameType.TREE_KILLED, FrameType.SOURCE_THAWED):
                        self.killed = True      # the source's tree is settled: the link's end is expected
                    self._answers[frame.type].set()
                    if self.killed:
                        return

    @property
    def pids_of_file(self):
        return {i: pid for pid, i in self._index.items()}

    def _landed(self, channel, body):
        pid, index, data = body.pid, body.index, bytes(body.data)
        file = self._index.get(pid)
        if file is None:
            raise ch.ProtocolError(f"{channel.name}: sent a chunk of pid {pid}, which has no pages here")
        fd, size, sums = self._files[file]
        want = min(self.chunk, size - index * self.chunk)
        if index >= len(sums) or len(data) != want:
            raise ch.ProtocolError(f"{channel.name}: corrupt chunk {index} of pid {pid}: {len(data)} bytes")
        if crc32c(data) != body.crc:
            raise ch.ProtocolError(f"{channel.name}: chunk {index} of pid {pid}: CRC-32C mismatch: corrupt")
        self._unanswered.discard((pid, index))
        now = time.monotonic()
        self._first = self._first or now
        self._last = now
        if self.server.there(file, index):
            return
        view = memoryview(data)
        pos = index * self.chunk
        while view:
            n = os.pwrite(fd, view, pos)
            view, pos = view[n:], pos + n
        self.server.landed(file, index, body.crc)
        if self.wanted[pid][index // 8] >> (index % 8) & 1:
            self._to_come -= 1
        os.eventfd_write(self._arrived, 1)
        self.received += len(data)
        if (pid, index) not in self._asked:
            self.pushed_bytes += len(data)

    def close(self):
        self._stop = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.channel is not None:
            self.dialer.release(self.channel)
            self.channel = None
        for fd, _, _ in self._files:
            os.close(fd)
        self._files = []
        for fd in (self._req_r, self._req_w, self._wake_r, self._wake_w, self._arrived):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pages.close()


class SourceDialer:
    """`lazy-pages --page-server`: each connection is a new one to the lazy dump's address and port."""

    def __init__(self, address, port, creds):
        self.address, self.port, self.creds = address, port, creds

    def connect(self, resumed):
        return auth.connect(self.address, self.port, "lazy source", Role.LAZY_DAEMON, {Role.LAZY_SOURCE},
                            self.creds)

    def rejoined(self, channel):
        """A reconnection is open and serving (nothing to repeat here)."""

    def untold_advice(self):
        """What becomes of a source that did not hear its replica is gone."""
        return ": it is left stopped there; `kill -CONT` it"

    def fds(self, committed):
        """More fds the fetcher watches: on_ready(channel, ready) when one is readable -> None, or why
        the fetch ends (the source was told); it may raise a NetError to give the link up."""
        return []

    def on_ready(self, channel, ready):
        return None

    def release(self, channel):
        channel.close()
