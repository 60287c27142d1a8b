"""`pycr dump --lazy-pages --address A --port P --secret-file F`: the source of a remote lazy restore.

criu's `dump --lazy-pages --port`: the images are written as by a dump,
except the contents of the pages a lazy restore serves on fault (private
anonymous VMAs, restore.lazy.is_lazy_vma): their place in pages-<pid>.img is
a hole (reads as zeros, summed as such in the manifest) and the inventory
says "lazy-dump", so that nothing restores the set without this source. The
pagemap lists every page, so the destination knows what to expect.

The tree stays frozen. One destination daemon at a time (after the
authentication, and only for this image set) gets the chunks it asks for
(PAGE_REQUEST: a fault waits) before the background stream, each chunk read
from the frozen task with process_vm_readv and sent with its CRC-32C; the
socket's send buffer is kept small, so a request waits behind at most about
a megabyte of stream. The stream starts at the commit point: before it, the
restore's own faults make the downtime, and on a slow link a megabyte ahead
of each would add seconds to it.

The commit point is RESUMING, which the daemon sends just before the replica
runs. Before it, a lost destination means nothing is lost: the tree is
thawed. From it on the source's memory is the only copy of the pages the
replica lacks: every process is sent SIGSTOP (pending while frozen), so that
whatever happens to this pycr, even SIGKILL, the tree never runs on next to
its replica. A lost link is then said in one line and the destination may
reconnect for PYCR_LAZY_RECONNECT x 2 seconds (the daemon retries for
PYCR_LAZY_RECONNECT; a replica that cannot get its pages is killed by its
watchdog). If it never comes back, this pycr detaches and leaves the tree
stopped: the one whole copy; `kill -CONT` brings it back once the replica is
known to be gone. ALL_PLACED ends it: the tree is killed, as a dump kills it.

A migration (`migrate --to --mode post-copy|hybrid`) gives a `link` instead
of a listener: the pages are served on the migration's own connection, and
after a lost link the source dials the destination again (link.again(); the
destination never connects to the source: lazy/migration_link.py).
"""

import bisect
import collections
import contextlib
import os
import signal
import socket
import time

from .. import manifest, outdir, progress, proc, settings, steps
from ..collect.memory import copy_runs, present_runs, private_vmas, split_lazy, write_hole
from ..collect.tree import reader
from ..dump import DumpStats, inventory, write_tree_images
from ..errors import PycrError
from ..formats import wire
from ..formats.wire import FrameType, Role
from ..freeze import freeze
from ..images import iter_page_runs
from ..log import log
from ..native.core import Copier, crc32c, vm_read
from ..net import auth, channel as ch
from ..stats import phase
from ..steps import deferred_signals
from ..sysinfo import page_size

PAGE = page_size()
SEND_BUFFER = 512 << 10     # the kernel doubles it: about 1 MiB of stream ahead of a priority chunk


def reconnect_window():
    """Seconds the daemon retries a lost link (the source waits twice as long)."""
    return float(os.environ.get("PYCR_LAZY_RECONNECT", "30"))


class LinkLost(PycrError):
    pass


class ReplicaGone(PycrError):
    """The destination's replica is dead for sure and the source tree runs again."""


class LazyDump:
    """The frozen tree's images (lazy pages as holes), then its pages over the network."""

    def __init__(self, root, images_dir, listener, creds, overwrite=False, link=None):
        self.root, self.images_dir, self.listener, self.creds = root, images_dir, listener, creds
        self.overwrite = overwrite
        # a migration's: link.first() its channel, link.again() a new one to the destination after a
        # loss, link.on_frame(frame) its RUNNING; then no listener
        self.link = link
        self.who = "lazy dump" if link is None else "post-copy"    # what its lines begin with
        self.channel = None         # with a link: the channel the last page went on, left open
        self.committed_at = None
        self.thaw = None
        self.before_leaving = None  # a migration's: called with the tree frozen before it is left stopped
        self.frozen = None
        self.srcs = {}
        self.layout = {}            # pid -> ([file offsets], [(offset, vaddr, length)]) of every run
        self.sizes = {}             # pid -> pages file size
        self.committed = False
        self.back_by = None         # after a loss past the commit: the monotonic time the window ends
        self.sent = 0
        self.stats = DumpStats()

    # ---------------------------------------------------------------- dump

    def _memory(self, pid, vmas, imgdir):
        src = self.srcs[pid]
        mine = private_vmas(vmas)
        runs = present_runs(src, mine)
        written = 0
        with imgdir.pages_writer(str(pid)) as f:
            for lazy, batch in split_lazy(runs, mine):
                if lazy:
                    write_hole(f.fileno(), f.sums, sum(batch[1::2]))
                else:
                    written += copy_runs(src, batch, mine, f)
            end = f.sums.pos
            f.flush()
            if os.fstat(f.fileno()).st_size < end:
                os.ftruncate(f.fileno(), end)
        from ..collect.memory import runs_to_entries
        imgdir.write("pagemap", {"owner": str(pid), "entries": runs_to_entries(runs)}, str(pid))
        table = [(off, vaddr, nr * PAGE) for vaddr, nr, _, off in iter_page_runs(runs_to_entries(runs))]
        self.layout[pid] = ([t[0] for t in table], table)
        self.sizes[pid] = sum(runs[1::2])
        log.info("pid %d: %d pages left in the task for the lazy restore, %d bytes written",
                 pid, (self.sizes[pid] - written) // PAGE, written)
        return written

    def dump(self):
        """Freeze, write the set; the tree stays frozen (thawed if this fails)."""
        started = time.monotonic()
        with outdir.writing(self.images_dir, self.overwrite) as imgdir, Copier():
            with phase("freeze"):
                self.frozen = freeze(self.root, timeout=settings.freeze_timeout())
            self.frozen_at = time.monotonic()
            self.srcs = {pid: reader(pid, threads) for pid, threads in self.frozen.processes.items()}
            self.stats.processes = len(self.frozen.processes)
            self.stats.threads = sum(len(t) for t in self.frozen.processes.values())
            try:
                with progress.step("dump"):
                    self.stats.pages_bytes = write_tree_images(self.frozen, imgdir, memory=self._memory)
                imgdir.write("inventory", inventory(self.root, "lazy-dump"))
                manifest.seal(imgdir)
                self.set_id = bytes(manifest.read(self.images_dir).set_id)
            except BaseException:
                log.info("dump failed: detaching, the tree goes on as before; removing what was written")
                self.frozen.thaw()
                raise
        self.stats.total_seconds = time.monotonic() - started
        log.info("lazy dump written in %.3f s; the tree stays frozen while its pages are served",
                 self.stats.total_seconds)

    @classmethod
    def of_frozen(cls, root, frozen, images_dir, listener, creds, link=None):
        """Serve the lazy pages of a set already written with the tree still frozen (the final dump
        of `migrate --mode hybrid`, options.lazy_anon): the pages file's layout comes from its pagemap
        (the runs this set holds itself, back to back); the parent's pages are in the replica already."""
        from ..images import ImageDir
        job = cls(root, images_dir, listener, creds, link=link)
        job.frozen = frozen
        job.frozen_at = time.monotonic()
        job.srcs = {pid: reader(pid, threads) for pid, threads in frozen.processes.items()}
        imgdir = ImageDir(images_dir)
        for pid in frozen.processes:
            table = [(off, vaddr, nr * PAGE) for vaddr, nr, in_parent, off in
                     iter_page_runs(imgdir.read("pagemap", str(pid))) if not in_parent]
            job.layout[pid] = ([t[0] for t in table], table)
            job.sizes[pid] = sum(t[2] for t in table)
        job.set_id = bytes(manifest.read(images_dir).set_id)
        return job

    # ---------------------------------------------------------------- pages

    def _chunk(self, pid, index):
        """Chunk `index` of pid's pages file, read from the frozen task."""
        size = self.sizes[pid]
        start = index * wire.LAZY_CHUNK
        end = min(size, start + wire.LAZY_CHUNK)
        offsets, table = self.layout[pid]
        out = bytearray()
        j = max(bisect.bisect_right(offsets, start) - 1, 0)
        pos = start
        while pos < end:
            off, vaddr, length = table[j]
            take = min(end, off + length) - pos
            addr = vaddr + (pos - off)
            try:
                out += vm_read(self.srcs[pid], addr, take)
            except OSError:             # PROT_NONE and the like: /proc/PID/mem reads them for a tracer
                fd = proc.open_mem(self.srcs[pid])
                try:
                    out += os.pread(fd, take, addr)
                finally:
                    os.close(fd)
            pos += take
            j += 1
        return bytes(out)

    def _nchunks(self, pid):
        return -(-self.sizes[pid] // wire.LAZY_CHUNK)

    # ---------------------------------------------------------------- serving

    def serve(self):
        """Serve daemons until one says every page is placed; -> 0. Raises after a thaw."""
        first = True
        try:
            while True:
                channel = self._accept() if self.link is None else self._dial(first)
                first = False
                done = False
                try:
                    done = self._session(channel)
                    if done:
                        return 0
                except (ch.NetError, OSError) as exc:
                    reason = str(exc) if isinstance(exc, ch.NetError) else (exc.strerror or str(exc))
                    if not self.committed:
                        self._thaw()
                        if isinstance(exc, ch.PeerFailed):      # the destination said why it gave up
                            raise PycrError(f"{exc}: the tree was thawed and goes on") from None
                        raise PycrError(f"{self.who}: the destination went away before its replica ran "
                                        f"({reason}): the tree was thawed and goes on") from None
                    again = self.back_by is not None
                    if not again:               # the window runs from the loss, not from each try
                        self.back_by = time.monotonic() + 2 * reconnect_window()
                    (log.info if again else log.warning)(
                        "%s: lost the destination after its replica started (%s); the tree stays "
                        "stopped; %s for up to %.0f s more", self.who, reason,
                        "waiting for the destination to reconnect" if self.link is None else
                        "connecting to the destination again", max(0.0, self.back_by - time.monotonic()))
                    if again:                   # a destination that refuses at once is not dialled in a loop
                        time.sleep(0.5)
                finally:
                    if done and self.link is not None:
                        self.channel = channel      # the migration's last words come on it
                    else:
                        channel.close()
        except KeyboardInterrupt:
            if not self.committed:
                self._thaw()
            else:
                self._leave_stopped()
            raise
        finally:
            if self.listener is not None:
                self.listener.close()

    def _gave_up(self):
        self._leave_stopped()
        raise PycrError(f"{self.who}: the destination did not come back within {2 * reconnect_window():g} "
                        "s: its replica cannot get its missing pages (its watchdog kills it); the "
                        "source tree is left stopped and detached, the one whole copy: `kill -CONT` "
                        "it once the replica is known to be gone, or kill it")

    def _dial(self, first):
        """A migration's channel: its own at first; after a loss (only after the commit: before it,
        a loss thaws the tree) a new connection to the destination, tried for the window."""
        if first:
            return self.link.first()
        if self.back_by is None:        # (a session refused without a loss)
            self.back_by = time.monotonic() + 2 * reconnect_window()
        while time.monotonic() < self.back_by:
            try:
                channel = self.link.again()
            except ch.AuthError as exc:
                log.warning("%s: %s", self.who, exc)
                break
            except (ch.NetError, OSError):
                time.sleep(0.5)
                continue
            log.warning("%s: connected to the destination again: %s", self.who, channel.name)
            return channel
        self._gave_up()

    def _accept(self):
        """The next authenticated daemon. Before the commit: as long as it takes; after: the window."""
        while True:
            left = None if self.back_by is None else self.back_by - time.monotonic()
            if left is not None and left <= 0:
                self._gave_up()
            if not ch.ready([self.listener], left):
                continue
            channel = auth.accept(self.listener, self.creds)
            try:
                channel.hello(Role.LAZY_SOURCE, {Role.LAZY_DAEMON})
                auth.server_handshake(channel, self.creds.secret)
                return channel
            except ch.NetError as exc:         # a stranger, a wrong secret or certificate: not its business
                log.warning("%s: refused %s", self.who, exc)
                channel.close()

    def _session(self, channel):
        # a migration's destination starts its daemon once the set is in: it may take the idle time
        opened = channel.recv(FrameType.LAZY_OPEN, idle=self.link is not None)
        if bytes(opened.body.set_id) != self.set_id:
            channel.error("this source serves another image set")
            log.warning("%s: %s restores another image set: refused", self.who, channel.name)
            return False
        todo = collections.OrderedDict()
        for w in opened.body.wanted:
            if w.pid not in self.sizes:
                raise ch.ProtocolError(f"{channel.name}: asks for pid {w.pid}, not in this tree")
            bits = bytes(w.bitmap)
            todo[w.pid] = collections.deque(i for i in range(self._nchunks(w.pid)) if i // 8 < len(bits)
                                            and bits[i // 8] >> (i % 8) & 1)
        with contextlib.suppress(OSError):
            channel.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        channel.send(FrameType.LAZY_READY, {"chunk_size": wire.LAZY_CHUNK, "committed": int(self.committed)})
        self.back_by = None         # a daemon took the pages up again: a later loss has its own window
        log.info("%s: serving %d chunks in the background%s", channel.name, sum(map(len, todo.values())),
                 " (a reconnection)" if opened.body.resumed else "")
        sent = {pid: set() for pid in todo}
        urgent = collections.deque()
        expect = (FrameType.PAGE_REQUEST, FrameType.RESUMING, FrameType.ALL_PLACED, FrameType.REPLICA_GONE)
        if self.link is not None:
            expect += (FrameType.RUNNING,)      # the destination's word that the replica runs
        while True:
            while channel.readable(0):
                frame = channel.recv(*expect)
                if frame.type == FrameType.RUNNING:
                    self.link.on_frame(frame)
                elif frame.type == FrameType.PAGE_REQUEST:
                    pid, index = frame.body.pid, frame.body.index
                    if pid not in self.sizes or index >= self._nchunks(pid):
                        raise ch.ProtocolError(f"{channel.name}: asks for chunk {index} of pid {pid}, "
                                               "which does not exist")
                    urgent.append((pid, index))
                elif frame.type == FrameType.RESUMING:
                    self._commit()
                    channel.send(FrameType.RESUMING_OK, {})
                elif frame.type == FrameType.REPLICA_GONE:
                    self._run_again()
                    with contextlib.suppress(ch.NetError):
                        channel.send(FrameType.SOURCE_THAWED, {})
                    raise ReplicaGone(f"{self.who}: the destination's watchdog killed its replica and saw every "
                                      "task of it exit (REPLICA_GONE): the source tree runs again, whole")
                else:
                    self._kill()
                    channel.send(FrameType.TREE_KILLED, {})
                    return True
            if urgent:
                pid, index = urgent.popleft()
                if index in sent.get(pid, ()):
                    # on its way already (in the socket buffers or on the link): a fault on it
                    # while it travels must not put it on the link a second time
                    continue
            else:
                # the background stream only once the replica is about to run (RESUMING): until then
                # what the restore faults on is the downtime, and nothing may queue ahead of it
                pid = next((p for p, q in todo.items() if q), None) if self.committed else None
                if pid is None:             # nothing to send now: wait for the daemon's word
                    if not channel.readable(settings.net_timeouts()[1]):
                        raise ch.PeerLost(f"{channel.name}: silent for {settings.net_timeouts()[1]:g} s")
                    continue
                index = todo[pid].popleft()
                if index in sent[pid]:
                    continue
            data = self._chunk(pid, index)
            channel.send(FrameType.PAGE_CHUNK, {"pid": pid, "index": index, "crc": crc32c(data), "data": data})
            sent.setdefault(pid, set()).add(index)
            self.sent += len(data)

    # ---------------------------------------------------------------- the tree

    def _commit(self):
        """The replica is about to run: from here the tree must never run on (module docstring)."""
        if not self.committed:
            for pid in self.frozen.processes:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGSTOP)
            self.committed = True
            self.committed_at = time.monotonic()
            # A stop signal from here on must not claim the tree was released: it is left stopped.
            steps.finish("dump", "the replica runs at the destination; the source tree is left stopped "
                                 "(SIGSTOP) and detached, the one whole copy until every page has moved: "
                                 "`kill -CONT` it only once the replica is known to be gone, else kill it")
            log.info("%s: the replica runs: the source tree is held stopped (SIGSTOP pending) "
                     "until its last page has moved", self.who)

    def _thaw(self):
        with deferred_signals():
            if self.thaw is not None:
                self.thaw()             # a migration's: also takes its dirty tracking out of the tree
            else:
                self.frozen.thaw()
        log.info("detached every thread: the tree goes on as before")

    def _run_again(self):
        """REPLICA_GONE: no task of the replica can run any more, so the frozen tree is the one copy
        and is whole: thawed; after the commit its pending SIGSTOP is cancelled first (a SIGCONT
        discards a pending stop signal; the tree, still held, sees it as after `kill -CONT`)."""
        with deferred_signals():
            if self.committed:
                for pid in self.frozen.processes:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGCONT)
                steps.finish("dump", "the destination's replica was killed; the source tree runs again")
            if self.thaw is not None:
                self.thaw()             # a migration's: also takes its dirty tracking out of the tree
            else:
                self.frozen.thaw()
        log.info("%s: REPLICA_GONE: detached every thread: the tree goes on as before", self.who)

    def _leave_stopped(self):
        with deferred_signals():
            try:
                if self.before_leaving is not None:
                    self.before_leaving()   # hybrid: its dirty tracking out of the tree, as when it thaws
            finally:
                self.frozen.thaw()      # detached with SIGSTOP pending: it stops before any instruction

    def _kill(self):
        with deferred_signals(), phase("waiting for PIDs to be free"):
            try:
                self.frozen.kill(timeout=settings.freeze_timeout())
            except PycrError as exc:
                log.warning("warning: %s", exc)
        self.stats.frozen_seconds = time.monotonic() - self.frozen_at
        log.info("every page is in the replica: killed the source tree with SIGKILL")


def lazy_dump(root, images_dir, address, port, creds, overwrite=False, on_listening=None):
    """The whole source side -> LazyDump (its stats and bytes sent). creds: auth.Credentials."""
    listener = ch.listen(address, port)         # refused here (port in use) before anything is frozen
    job = LazyDump(root, images_dir, listener, creds, overwrite)
    try:
        job.dump()
    except BaseException:
        listener.close()
        raise
    if on_listening:                # the set is sealed: it may be copied to the destination now
        on_listening(ch.describe(listener.getsockname()))
    job.serve()
    return job
