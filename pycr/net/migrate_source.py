"""`pycr migrate --to HOST:PORT`: the source side of a migration between two hosts.

The passes are those of the local migration (pycr.migrate.loop.SourcePasses:
pre-dumps while the tree runs, then the final dump with the tree kept
frozen), each set sent over the authenticated channel (pycr.net.image_sets)
to `pycr serve`, which applies it to its stopped replica and answers
SET_APPLIED before the next pass is taken.

The commit point: after the final set the destination says READY (replica
complete and stopped); only then is the frozen tree killed (TCP repair
first, as in a local migration), and KILLED tells the destination to
resume. Any failure before READY thaws the source and takes pycr's dirty
tracking out of it. If the link dies after the final set was sent, the
source delivers its VERDICT (killed, or thawed) on a new connection, trying
for PYCR_MIGRATE_DOUBT_TIMEOUT seconds: the destination never resumes
without it.

Post-copy and hybrid: after the lazy final set the same connection carries
the pages (lazy.remote_source.LazyDump with a _PagesLink); after its commit
point a lost link is won back by dialling the destination again
(LAZY_RESUME): the destination never connects to the source.
"""

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

from .. import options, proc, settings
from ..cliopts import plural
from ..errors import PycrError, TaskGone
from ..formats.wire import FrameType, Role
from ..log import log
from ..migrate import loop
from ..migrate.report import budget_lines, image_set_size
from ..lazy.remote_source import LazyDump
from ..restore import handover
from ..steps import step
from . import auth, channel as ch
from .image_sets import SetSender, send_set

MIB = 1 << 20


@dataclass
class NetPassReport:
    number: int
    kind: str               # pre-dump | dump
    added: int
    removed: int
    recreated: int
    pages: int              # pages the set carries
    bytes: int              # bytes of all its files, sent
    dump_seconds: float     # taking the set
    send_seconds: float     # sending it (the link's time for it)
    apply_seconds: float    # the destination applying it
    dirty_rate: float       # bytes/s of pages written between this pass and the previous (None for pass 1)
    bandwidth: float = 0.0  # bytes/s: what was sent over the send time, then the policy's measure
    # filled in by the convergence policy (pycr.migrate.converge), as in a local PassReport:
    expected_downtime: float = None
    throttle: int = None
    early_seconds: float = 0.0  # of send_seconds, while the set was taken (a final pass's pages files)

    @property
    def seconds(self):
        return self.dump_seconds + self.send_seconds - self.early_seconds + self.apply_seconds

    def line(self):
        extra = f", {self.recreated} re-created" if self.recreated else ""
        dirty = "-" if self.dirty_rate is None else f"{self.dirty_rate / MIB:.1f} MiB/s"
        # the policy's measure is None for a pass that copied too little to tell
        sent = "-" if self.bandwidth is None else f"{self.bandwidth / MIB:.1f}"
        out = (f"pass {self.number} {self.kind}: +{self.added} -{self.removed} tasks{extra}, "
               f"{self.pages} pages, {self.bytes} bytes, {self.seconds:.3f} s "
               f"(dump {self.dump_seconds:.3f} s, send {self.send_seconds:.3f} s"
               + (f" ({self.early_seconds:.3f} s during the dump)" if self.early_seconds else "")
               + ", replica "
               f"{self.apply_seconds:.3f} s), {sent} MiB/s sent, dirty {dirty}")
        if self.expected_downtime is not None:
            out += f", expected downtime {self.expected_downtime * 1000:.0f} ms"
        if self.throttle is not None:
            out += f", throttle {self.throttle} %"
        return out


@dataclass
class NetMigration:
    destination: str
    reports: list = field(default_factory=list)
    downtime: float = 0.0
    total_seconds: float = 0.0
    root_pid: int = 0
    root_real: int = 0
    init_real: int = 0

    mode: str = "pre-copy"
    lazy: object = None             # LazyPhase of post-copy and hybrid
    downtime_limit: float = None    # s, the budget asked for
    expected: float = None          # s, the policy's estimate when it chose the final pass
    throttle_max: int = 0
    throttle_kind: str = ""

    def lines(self):
        where = (f"pid {self.root_real} outside its namespace, namespace init {self.init_real}" if self.init_real
                 else "its original PIDs on that host")
        total = sum(r.bytes for r in self.reports) + (self.lazy.bytes if self.lazy else 0)
        out = [f"replica on {self.destination}: root pid {self.root_pid} ({where})"]
        if self.lazy is not None:
            out.append(self.lazy.line())
        out.append(f"downtime {self.downtime:.3f} s (source frozen -> replica running), {total} bytes sent in "
                   f"{plural(len(self.reports), 'pass')}{' and the post-copy phase' if self.lazy else ''} ({self.mode}), "
                   f"{self.total_seconds:.3f} s in all")
        return out + budget_lines(self.downtime, self.downtime_limit, self.expected, self.throttle_max,
                                  self.throttle_kind)


@dataclass
class LazyPhase:
    """The post-copy phase: the final set's private anonymous pages moved after the replica ran."""
    faults: int
    fault_pages: int
    pushed_pages: int
    zero_pages: int
    median_us: float
    p99_us: float
    seconds: float          # replica running -> last page placed
    bytes: int              # bytes of pages sent by the source

    def line(self):
        rate = self.bytes / self.seconds / MIB if self.seconds > 0 else 0.0
        return (f"post-copy: {self.fault_pages} pages served on {self.faults} faults, {self.pushed_pages} pushed, "
                f"{self.zero_pages} zero; fault median {self.median_us:.1f} us, p99 {self.p99_us:.1f} us; "
                f"last page after {self.seconds:.3f} s; {self.bytes} bytes ({rate:.1f} MiB/s)")


MODES = ("pre-copy", "post-copy", "hybrid")


def _split(address):
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise PycrError(f"--to {address}: give it as HOST:PORT")
    return host.strip("[]"), int(port)


def _connect(host, port, creds):
    return auth.connect(host, port, "destination", Role.MIGRATE_SOURCE, {Role.MIGRATE_DEST}, creds)


def migrate_to(root, address, creds, policy=None, tracker="auto", work_dir=None, on_pass=None, mode="pre-copy"):
    """Move the tree rooted at root to `pycr serve` at address (HOST:PORT) -> NetMigration.
    creds: auth.Credentials (the secret; the certificates under --tls).

    Raises a PycrError with the source running as it was (thawed, untracked)
    and the destination's replica discarded, unless the source was killed:
    then the error says so."""
    try:
        if proc.status(root).tgid != root:
            raise PycrError(f"pid {root} is a thread, not a process")
    except TaskGone:
        raise TaskGone(root, "no process to migrate") from None
    if mode not in MODES:
        raise PycrError(f"--mode {mode}: one of {', '.join(MODES)}")
    host, port = _split(address)
    started = time.monotonic()
    chan = _connect(host, port, creds)           # before anything is frozen or tracked
    keep = work_dir is not None
    if not keep:
        loop.sweep_work_dirs()
    work_dir = os.path.abspath(work_dir) if keep else tempfile.mkdtemp(prefix=loop.WORK_PREFIX)
    os.makedirs(work_dir, mode=0o700, exist_ok=True)
    lock = None if keep else loop._hold(work_dir)
    source = loop.SourcePasses(root, work_dir, tracker, policy)
    handover.forget()
    source.lazy_final = mode == "hybrid"
    result = NetMigration(chan.name.split()[-1], mode=mode)
    run = _Run(chan, source, result, os.urandom(16), (host, port), creds, on_pass)
    try:
        with options.using(other_host=True):
            if mode == "post-copy":
                run.post_copy(root, work_dir)
            else:
                run.passes(root)
    finally:
        chan.close()
        run.chan.close()
        if not keep:
            shutil.rmtree(work_dir, ignore_errors=True)
            os.close(lock)
    result.total_seconds = time.monotonic() - started
    result.downtime_limit = source.policy.downtime_limit
    result.expected = source.converge.last_expected
    result.throttle_max, result.throttle_kind = source.converge.max_percent, source.converge.mechanism
    return result


class _Run:
    """One migration's conversation, and what each failure leaves behind."""

    def __init__(self, chan, source, result, migration_id, where, creds, on_pass):
        self.chan, self.source, self.result = chan, source, result
        self.id, self.where, self.creds, self.on_pass = migration_id, where, creds, on_pass
        self.pass_started = []

    def passes(self, root):
        self.chan.send(FrameType.MIGRATION, {"id": self.id, "root_pid": root})
        final_sent = False
        senders = {}

        def early(path, number):
            """The final pass's pages files go on the link while the rest of its set is collected."""
            senders[path] = SetSender(self.chan, path, number, True)
            return senders[path].early

        self.source.early = early
        try:
            while True:
                self.pass_started.append(time.monotonic())
                path = self.source.next_image_set()
                final = self.source.final_taken
                dump_seconds = self.source.last_seconds
                sender = senders.pop(path, None) or SetSender(self.chan, path, len(self.source.deltas), final)
                sender.finish()
                send_seconds = sender.seconds   # a final pass's pages files went during its dump
                early_seconds = sender.early_seconds
                if final and self.source.lazy_final:
                    break
                if final:
                    final_sent = True
                    self.chan.recv(FrameType.READY, idle=True)
                    step("READY received")      # the source is still whole: a failure here thaws it
                    break
                applied = self.chan.recv(FrameType.SET_APPLIED, idle=True).body
                self._report(path, applied, dump_seconds, send_seconds, early_seconds)
        except BaseException as exc:
            self.source.finish(False)           # thawed, tracking taken out
            if final_sent and isinstance(exc, ch.NetError) and not isinstance(exc, ch.PeerFailed):
                # the destination may hold a complete replica, waiting for KILLED: say it will not come
                self.chan.error(f"the source gave up and runs again ({exc})", linger=0.2)
                self._tell(killed=False)
            raise
        if self.source.lazy_final:
            self._hybrid_final(path, dump_seconds, send_seconds)
            return
        self._commit(path, dump_seconds, send_seconds, early_seconds)

    # -- post-copy and hybrid: the final set's private anonymous pages stay in the frozen tree,
    # served on this same connection (the destination never connects to the source)

    def post_copy(self, root, work_dir):
        """One short freeze: the tree without its private anonymous pages (a lazy dump), sent; the
        replica runs at once and those pages move on fault and in the background."""
        self.chan.send(FrameType.MIGRATION, {"id": self.id, "root_pid": root})
        path = os.path.join(work_dir, "01-dump")
        job = LazyDump(root, path, None, self.creds, link=_PagesLink(self))
        self.pass_started.append(time.monotonic())
        job.dump()                              # frozen from here (thawed if the dump fails)
        self.source.deltas.append(job.stats.pages_bytes)
        self.source.final_taken = True
        self._lazy_serve(job, path, job.stats.total_seconds)

    def _hybrid_final(self, path, dump_seconds, send_seconds):
        """The final set was sent without the pages dirtied since the previous pass: serve them."""
        source = self.source
        job = LazyDump.of_frozen(source.root, source.frozen, path, None, self.creds, link=_PagesLink(self))
        job.frozen_at = source.frozen_at
        job.thaw = lambda: source.finish(False)     # thawed, its dirty tracking taken out
        job.before_leaving = source.untrack_frozen  # left stopped: the same tracking out first
        self._lazy_serve(job, path, dump_seconds, sent=(send_seconds,))

    def _lazy_serve(self, job, path, dump_seconds, sent=None):
        try:
            if sent is None:
                at = time.monotonic()
                send_set(self.chan, path, len(self.source.deltas), True)
                sent = (time.monotonic() - at,)
            step("lazy set sent")
        except BaseException:
            job._thaw()
            raise
        job.serve()             # until every page is placed: the tree is killed; raises after a thaw
        self.source.frozen = None
        handover.forget()
        if job.channel is not self.chan:        # the link was lost and won back: the last words come there
            self.chan.close()
            self.chan = job.channel
        running = job.link.running
        while True:             # RUNNING (if it did not come while pages went), then LAZY_DONE
            frame = self.chan.recv(FrameType.RUNNING, FrameType.LAZY_DONE, idle=True)
            if frame.type == FrameType.LAZY_DONE:
                done = frame.body
                break
            running = frame.body
        if running is None:
            raise ch.ProtocolError(f"{self.chan.name}: sent LAZY_DONE, but never RUNNING")
        self.result.downtime = job.committed_at - job.frozen_at
        self._report(path, running, dump_seconds, sent[0])
        self.result.root_pid, self.result.root_real = running.root_pid, running.root_real
        self.result.init_real = running.init_real
        if not done.ok:
            raise PycrError(f"the replica could not get its pages: {done.message}")
        self.result.lazy = LazyPhase(done.faults, done.fault_pages, done.pushed_pages, done.zero_pages,
                                     done.median_ns / 1000, done.p99_ns / 1000, done.seconds_us / 1e6, job.sent)
        log.info("%s", self.result.lazy.line())

    def _commit(self, path, dump_seconds, send_seconds, early_seconds=0.0):
        """READY came: kill the frozen tree, then KILLED; the destination answers RUNNING."""
        frozen_at = self.source.frozen_at
        self.source.finish(True, wait=False)    # SIGKILLed: it never runs again; its reaping can wait
        try:
            self.chan.send(FrameType.KILLED)
            running = self.chan.recv(FrameType.RUNNING).body
        except ch.NetError as exc:
            log.warning("pycr migrate: %s after the source was killed: telling the destination again", exc)
            running = self._tell(killed=True)
        self.result.downtime = time.monotonic() - frozen_at
        self.source.wait_killed()
        self._report(path, running, dump_seconds, send_seconds, early_seconds)
        self.result.root_pid, self.result.root_real = running.root_pid, running.root_real
        self.result.init_real = running.init_real

    def _tell(self, killed):
        """Deliver the VERDICT on new connections until the destination takes it -> its RUNNING (killed)."""
        wait = settings.migrate_doubt_timeout()
        deadline = time.monotonic() + wait
        last = None
        self.chan.close()
        while time.monotonic() < deadline:
            try:
                chan = _connect(*self.where, self.creds)
            except ch.AuthError:
                raise
            except PycrError as exc:
                last = exc
                time.sleep(0.5)
                continue
            self.chan.close()
            self.chan = chan
            try:
                chan.send(FrameType.VERDICT, {"id": self.id, "killed": int(killed)})
                if killed:
                    return chan.recv(FrameType.RUNNING).body
                chan.recv()                     # its ERROR: the replica is discarded
            except ch.PeerFailed as exc:
                if killed:
                    raise PycrError(f"the source tree was killed, but the destination refused its VERDICT "
                                    f"({exc}): its replica is left stopped or gone; see pycr serve's output") \
                        from None
                log.info("%s", exc)
                return None
            except ch.NetError as exc:
                last = exc
                time.sleep(0.5)
                continue
        if killed:
            raise PycrError(f"the source tree was killed, but the destination could not be told within "
                            f"{wait:g} s ({last}): its replica stays stopped there until it is given SIGCONT "
                            "(it runs nowhere now)")
        log.warning("pycr migrate: the destination could not be told that the source runs again (%s); its "
                    "replica is kept stopped there, never resumed", last)
        return None

    def _report(self, path, applied, dump_seconds, send_seconds, early_seconds=0.0):
        pages, size = image_set_size(path)
        number = len(self.result.reports) + 1
        dirty = None
        if number > 1:
            interval = self.pass_started[-1] - self.pass_started[-2]
            dirty = self.source.deltas[-1] / interval if interval > 0 else None
        rep = NetPassReport(number=number, kind="dump" if self.source.final_taken and number ==
                            len(self.source.deltas) else "pre-dump", added=applied.added,
                            removed=applied.removed, recreated=applied.recreated, pages=pages, bytes=size,
                            dump_seconds=dump_seconds, send_seconds=send_seconds,
                            apply_seconds=applied.apply_us / 1e6, dirty_rate=dirty,
                            bandwidth=size / send_seconds if send_seconds > 0 else 0.0,
                            early_seconds=early_seconds)
        # The link's time is the pass's copy time: the policy measures the bandwidth over it.
        self.source.applied(rep, link_seconds=send_seconds)
        self.result.reports.append(rep)
        log.info("%s", rep.line())
        if self.on_pass is not None:
            self.on_pass(rep)


class _PagesLink:
    """The post-copy pages of a migration go on its own channel; after a lost link (past the commit
    point) the source connects to the destination again and says which migration goes on."""

    def __init__(self, run):
        self.run = run
        self.running = None         # the destination's RUNNING (it may come while pages are served)

    def first(self):
        return self.run.chan

    def again(self):
        chan = _connect(*self.run.where, self.run.creds)
        try:
            chan.send(FrameType.LAZY_RESUME, {"id": self.run.id})
        except BaseException:
            chan.close()
            raise
        return chan

    def on_frame(self, frame):
        self.running = frame.body
