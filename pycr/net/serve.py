"""`pycr serve`: the destination of a migration between two hosts.

It runs one migration at a time; the connections that come between migrations
are greeted side by side (pycr.net.greeter), so that a silent one holds no
source back. Nothing a peer sends is read past its hello before the peer has
proved it holds the secret (pycr.net.auth). An
authenticated source announces its migration (MIGRATION: a random ID), then
sends one image set per pass; NetworkTransport lands each set in a new
directory of the work directory and hands it to the same destination loop
as `pycr restore --follow` (pycr.migrate.follow): load_images checks the
manifest as for any restore before the set touches the replica, and the
replica is built from the first set and fixed up by each later one. After
each pre-dump set it answers SET_APPLIED.

The commit point (docs/design.md, "Migration between two hosts"): once the
final set is applied the replica is complete and held stopped; the
destination says READY and resumes it only on the source's KILLED. If the
link dies there, the destination cannot know whether the source still runs:
it keeps the replica stopped and accepts, for PYCR_MIGRATE_DOUBT_TIMEOUT
seconds, a new authenticated connection carrying the source's VERDICT
(killed: resume; thawed: discard). With no verdict by then the replica is
left stopped with SIGSTOP (never resumed, never killed: the tree may exist
nowhere else), and one line says what to do.

A lazy final set (post-copy, hybrid) hands the connection to a lazy-pages
daemon forked for it (lazy/migration_link.py), which gets the pages on it
and, after a lost link, accepts the source's new connection on this
listener. A source that comes back only after that daemon gave up and its
replica was killed is told so (pycr.net.gone), and runs its tree again.
"""

import contextlib
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from .. import formats, images, settings, steps
from ..errors import ImageError, Interrupted, PycrError
from ..formats.wire import FrameType, Role
from ..images import ImageDir
from ..log import log
from ..migrate.follow import follow
from ..migrate.replica import FINAL_KINDS
from ..migrate.transport import Transport
from . import auth, channel as ch
from ..lazy.child import DaemonChild
from ..lazy.migration_link import MigrationLink
from .gone import Gone
from .greeter import Greeter
from .image_sets import receive_set

WORK_PREFIX = "pycr-serve-"


class NetworkTransport(Transport):
    """The image sets of one migration, as they arrive over an authenticated channel."""

    # serve --host-pids: the replica's PIDs must be free on this host, checked before any task exists
    pids_advice = "serve without --host-pids (the replica then gets a PID namespace of its own)"

    def __init__(self, channel, listener, creds, work_dir, migration_id):
        self.channel = channel
        self.listener = listener        # for the source's VERDICT if the link dies at the commit point
        self.creds = creds
        self.work_dir = work_dir
        self.migration_id = migration_id
        self.sets = []
        self.final_seen = False
        self.kept_stopped = False
        self.bytes = 0
        self.daemon = None              # lazy.child.DaemonChild of a lazy final set
        self.lazy_link = None
        self.gone_set = None            # its image set's ID once its replica died with its source away

    def next_image_set(self, stream=None):
        if self.final_seen:
            raise PycrError("the final image set was applied already")
        begin = self.channel.recv(FrameType.SET_BEGIN, idle=True)
        number = len(self.sets) + 1
        if begin.body.number != number:
            raise ch.ProtocolError(f"{self.channel.name}: sent pass {begin.body.number} where pass {number} "
                                   "was due")
        final = bool(begin.body.final)
        previous = self.sets[-1] if self.sets else None
        checked = []

        def streaming(path):
            """The set's small images are in: check its place in the chain before the replica
            hears of it, then let its pages go into the replica as they arrive. Pages that came
            before the rest (a final pass's, net.image_sets.SetSender) let the set land whole."""
            if not ImageDir(path).exists("inventory"):
                return None
            self._check_chain(path, previous, final)
            checked.append(path)
            return stream.begin(path)

        path = receive_set(self.channel, self.work_dir, begin, streaming if stream is not None else None)
        self.sets.append(path)
        if not checked:
            self._check_chain(path, previous, final)
        self.final_seen = final
        if str(ImageDir(path).read("inventory").kind) == "lazy-dump":
            self._start_daemon(path)
        return path

    def _start_daemon(self, path):
        """A lazy final set (post-copy, hybrid): its private anonymous pages are in the frozen source
        tree; a lazy-pages daemon fetches them for the replica over this connection, which it owns
        from now on (lazy/migration_link.py): self.channel becomes the way to it."""
        log.info("%s: the final set's anonymous pages stay at the source: starting the lazy-pages daemon, "
                 "which asks for them on this connection", self.channel.name)
        link = MigrationLink(self.channel, self.listener, self.creds, self.migration_id)
        try:
            self.daemon = DaemonChild(path, self.work_dir, link)
        finally:
            self.channel = link.parent_end or self.channel
        self.lazy_link = self.daemon.link

    def _check_chain(self, path, previous, final):
        """The set's inventory names the previous set as its parent (none for the first), and its
        kind is what the source announced."""
        inventory = ImageDir(path).read("inventory")
        parent = inventory.parent
        if previous is None and parent:
            raise ImageError(path, f"begins the migration but names a parent ({parent})")
        if previous is not None and (os.path.realpath(os.path.join(path, parent or "."))
                                     != os.path.realpath(previous)):
            raise ImageError(path, f"names {parent or 'no parent'} as its parent, not the previous pass "
                                   f"{os.path.basename(previous)}")
        if (str(inventory.kind) in ("dump", "lazy-dump")) != final:
            raise ImageError(path, f"is a {inventory.kind}, but the source announced "
                                   f"{'the final dump' if final else 'a pre-dump'}")

    def on_pass(self, rep, replica):
        """Tell the source a set is applied (SET_APPLIED), or that the replica runs (RUNNING)."""
        figures = {"number": rep.number, "added": rep.added, "removed": rep.removed,
                   "recreated": rep.recreated, "apply_us": int(rep.apply_seconds * 1e6)}
        self.bytes += rep.bytes
        if rep.kind not in FINAL_KINDS:
            self.channel.send(FrameType.SET_APPLIED, figures)
            return
        root = replica.tasks[replica.images.inventory.root_pid]
        try:
            self.channel.send(FrameType.RUNNING, dict(figures, root_pid=root.pid, root_real=root.real,
                                                      init_real=replica.init_real or 0))
        except ch.NetError as exc:
            log.warning("the replica runs, but the source was not told: %s", exc)

    def commit(self, replica):
        if self.daemon is not None:
            # post-copy: the commit point is the daemon's RESUMING to the source (the restore's "go",
            # just before the release); the source stays frozen until the last page has moved
            return
        try:
            self.channel.send(FrameType.READY)
            log.info("%s: replica complete and stopped: READY sent, waiting for KILLED", self.channel.name)
            self.channel.recv(FrameType.KILLED)
            log.info("%s: KILLED: the source tree is gone", self.channel.name)
            return
        except ch.PeerFailed:
            raise                       # the source gave up before killing its tree
        except ch.NetError as exc:
            lost = exc
        self._settle(replica, lost)

    def _settle(self, replica, lost):
        """The link died between READY and KILLED: wait for the source's VERDICT, replica stopped."""
        wait = settings.migrate_doubt_timeout()
        log.warning("pycr serve: %s after READY: the replica is kept stopped; waiting up to %g s for the "
                    "source to say whether it killed its tree", lost, wait)
        self.channel.close()
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            verdict = self._next_verdict(left)
            if verdict is None:
                continue
            if verdict.killed:
                log.info("%s: VERDICT: the source tree was killed: the replica resumes", self.channel.name)
                return
            raise PycrError(f"{self.channel.name}: the source thawed its tree (VERDICT): the replica is discarded")
        hold_stopped(replica)
        self.kept_stopped = True

    def _next_verdict(self, left):
        """The VERDICT of the next authenticated connection naming this migration, or None."""
        self.listener.settimeout(left)
        try:
            chan = auth.accept(self.listener, self.creds)
        except (socket.timeout, OSError):
            return None
        try:
            chan.hello(Role.MIGRATE_DEST, {Role.MIGRATE_SOURCE})
            auth.server_handshake(chan, self.creds.secret)
            frame = chan.recv(FrameType.VERDICT, FrameType.MIGRATION)
            if frame.type == FrameType.MIGRATION or bytes(frame.body.id) != self.migration_id:
                chan.error("busy: another migration is being settled here")
                chan.close()
                return None
        except ch.NetError as exc:
            log.warning("pycr serve: while settling a migration: %s", exc)
            chan.close()
            return None
        self.channel = chan
        return frame.body

    def finish(self, ok):
        if not ok and self.daemon is not None:
            self.daemon.kill(why=_why(sys.exc_info()[1]))     # follow() calls this while its failure propagates

    def lazy_done(self):
        """The replica runs; wait for the daemon to place its last page (or fail: its watchdog killed
        the replica) and tell the source so itself (LAZY_DONE) -> the daemon's figures."""
        try:
            got = self.daemon.wait()    # the daemon sent LAZY_DONE itself
        except Interrupted as stop:
            # a stop signal to serve alone (kill PID, a service manager): the daemon is stopped the way
            # a Ctrl-C to the whole group stops it, so the message is true: the replica is killed and
            # the source told (REPLICA_GONE), which runs its tree again
            self.daemon.stop(stop.signum)
            raise
        self.channel.close()
        error = got.get("error", "")
        if got.get("gone_untold"):      # the replica is dead and its source did not hear it (net/gone.py)
            self.gone_set = bytes.fromhex(got["gone_untold"])
        if error:
            raise PycrError(f"the replica could not get its pages and was killed: {error}")
        log.info("%s", got.get("line", ""))
        return got


def _why(failure):
    """What the source is told of a restore that failed (in one line)."""
    if isinstance(failure, Interrupted):
        return (f"pycr serve was interrupted by {signal.Signals(failure.signum).name}: the replica is "
                "discarded")
    return str(failure) if failure is not None else "the restore failed"


def hold_stopped(replica):
    """Leave the finished replica stopped: a SIGSTOP pending in every process, then the detach."""
    for task in replica.tasks.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(task.real, signal.SIGSTOP)
    root = replica.tasks[replica.images.inventory.root_pid]
    where = f", namespace init {replica.init_real}" if replica.init_real else ""
    log.warning("pycr serve: no word from the source: its tree may be killed or may run again; the replica "
                "is left stopped (SIGSTOP), root pid %d (pid %d here%s): send it SIGCONT only if the source "
                "tree is gone, else kill it", root.pid, root.real, where)


@dataclass
class Served:
    peer: str
    passes: int
    bytes: int
    root_pid: int
    root_real: int
    init_real: int
    kept_stopped: bool

    def line(self):
        state = "left STOPPED (the source's fate is unknown)" if self.kept_stopped else "runs"
        where = (f"pid {self.root_real} outside its namespace, namespace init {self.init_real}" if self.init_real
                 else "its original PIDs on this host")
        return (f"serve: replica from {self.peer} {state}: root pid {self.root_pid} ({where}), "
                f"{self.passes} passes, {self.bytes} bytes")


def serve_one(chan, first, listener, creds, work_top, pidns=True, gone=None):
    """Run the migration a source opened on `chan` (greeted: its MIGRATION frame `first`) -> Served;
    a PycrError (the replica discarded) if the migration fails. gone: a net.gone.Gone, told of a
    replica killed while its source was away."""
    log.info("%s: migration of pid %d begins", chan.name, first.body.root_pid)
    steps.begin("serve")            # a stop signal from here on discards the replica
    work = tempfile.mkdtemp(prefix=WORK_PREFIX, dir=work_top)
    transport = NetworkTransport(chan, listener, creds, work, bytes(first.body.id))
    try:
        result = follow(transport, pidns=pidns, on_pass=transport.on_pass)
        if transport.daemon is not None:
            transport.lazy_done()
    except PycrError as exc:
        transport.channel.error(str(exc))
        if transport.gone_set is not None and gone is not None:
            gone.add(transport.migration_id, transport.gone_set)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
        transport.channel.close()
        chan.close()
    replica = result.replica
    root = replica.tasks[replica.images.inventory.root_pid]
    return Served(chan.name, len(result.reports), transport.bytes, root.pid, root.real,
                  replica.init_real or 0, transport.kept_stopped)


class Reaper:
    """Reaps the replicas serve started (their namespace init, or their root) when they exit, not
    when serve exits: a thread polls one pidfd per child and waits for exactly that pid, so no
    other wait of pycr's (a lazy-pages daemon, a restore's helper) is ever stolen."""

    def __init__(self):
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._new = []
        self._lock = threading.Lock()
        threading.Thread(target=self._run, name="pycr-reaper", daemon=True).start()

    def add(self, pid):
        """Reap pid when it exits, if it is serve's own child."""
        if not pid or _parent_of(pid) != os.getpid():
            return
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return
        with self._lock:
            self._new.append((pid, fd))
        os.write(self._wake_w, b"+")

    def _run(self):
        watched = {}
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == self._wake_r:
                    os.read(self._wake_r, 512)
                    with self._lock:
                        new, self._new = self._new, []
                    for pid, pidfd in new:
                        watched[pidfd] = pid
                        poller.register(pidfd, select.POLLIN)
                    continue
                pid = watched.pop(fd)
                poller.unregister(fd)
                os.close(fd)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
                log.info("reaped pid %d, the end of a replica serve had started", pid)


def _parent_of(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def serve(listener, creds, work_top=None, pidns=True, once=False, on_done=None):
    """Accept migrations on listener until once is done (or forever), from peers that prove
    themselves with creds (auth.Credentials: the secret, and the certificates under --tls).

    on_done(Served or PycrError) after each. A failed migration with once raises."""
    if work_top is not None:
        work_top = os.path.abspath(work_top)    # a set names its parent by a relative path
        os.makedirs(work_top, mode=0o700, exist_ok=True)
    reaper = None if once else Reaper()
    gone = Gone()
    greeter = Greeter(listener, creds, gone)
    # once, before any migration: a final set's images are then parsed 3-4x faster in the downtime
    images.compile_schemas(formats.KINDS)
    while True:
        steps.finish("serve", "no migration was in progress; the replicas it made go on")
        try:
            chan, first = greeter.next()
            got = serve_one(chan, first, listener, creds, work_top, pidns, gone)
        except PycrError as exc:
            if once:
                raise
            if on_done is not None:
                on_done(exc)
            continue
        finally:
            greeter.done()
        if reaper is not None:
            reaper.add(got.init_real or got.root_real)
        if on_done is not None:
            on_done(got)
        if once:
            return got
