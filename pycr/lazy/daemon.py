"""`pycr lazy-pages -D DIR`: serve the pages of one lazy restore, then exit with a summary.

criu's shape: the daemon listens on a unix socket in the work directory
(lazy-pages.sock); `pycr restore --lazy-pages` connects, proves it restores
the same image set, and hands over each restored process's userfaultfd
(registered MISSING on its anonymous private ranges) with a pidfd, as soon as
that process's address space is built: from then on any touch of a missing
page, by the task or by the kernel on its behalf, is served here. Before a
uffd is added to the native FaultServer the watchdog holds copies of it and of
the pidfd (see watchdog.py); "go" confirms the daemon is alive just before the
tree is released. The server thread places faulting pages first and pushes
the rest in the background; once the restore has said "go" and every page is
placed, the watchdog lets go, the uffds are closed and the daemon exits.
"""

import contextlib
import os
import socket
import statistics
import threading
import time
from dataclasses import dataclass

from .. import settings
from ..errors import PycrError
from ..log import log
from ..native.core import FaultServer
from ..sysinfo import page_size
from . import protocol, watchdog
from .source import LocalPages

PAGE = page_size()


@dataclass
class Summary:
    faults: int
    fault_pages: int
    pushed_pages: int
    zero_pages: int
    dropped: int
    forks: int
    seconds: float
    median_us: float
    p99_us: float
    extra: str = ""

    def line(self):
        return (f"lazy-pages: {self.fault_pages + self.pushed_pages} pages placed ({self.fault_pages} on "
                f"{self.faults} faults, {self.pushed_pages} pushed), {self.zero_pages} zero, "
                f"{self.dropped} dropped by the program, {self.forks} forks, in {self.seconds:.2f} s; "
                f"fault median {self.median_us:.1f} us, p99 {self.p99_us:.1f} us{self.extra}")


def _percentile(times, q):
    if not times:
        return 0.0
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000


class Daemon:
    def __init__(self, images_dir, work_dir, source=None):
        self.source = source or LocalPages(images_dir)
        self.path = protocol.socket_path(work_dir)
        self.dog = None
        self.server = None
        self.listener = None
        self.error = None
        self.conn = None
        self.thread = None
        self.gone_untold = False        # the replica ran and is dead, and the source did not hear it

    def _listen(self):
        with contextlib.suppress(FileNotFoundError):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                with protocol.addressable(self.path) as name:
                    probe.connect(name)
                raise PycrError(f"another lazy-pages daemon listens on {self.path}")
            except ConnectionRefusedError:
                os.unlink(self.path)        # a stale socket of a killed daemon
            finally:
                probe.close()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            with protocol.addressable(self.path) as name:
                self.listener.bind(name)
        finally:
            os.umask(old)
        self.listener.listen(1)
        log.info("lazy-pages: listening on %s", self.path)

    def run(self, on_listening=None):
        started = None
        self.went = False               # the restore said "go": the replica ran
        try:
            self.dog = watchdog.start()         # before any thread or socket of ours
            self.server = FaultServer(self.source.files(), self.source.chunk, remote=self.source.remote())
            self.source.attach(self.server)         # a remote source connects now, before any task exists
            self.push_delay = settings.lazy_push_delay()
            if self.push_delay:             # fault-only until "go" + the delay
                self.server.push_from(time.monotonic_ns() + 3600 * 10**9)
            self._listen()
            if on_listening:
                on_listening(self.path)
            conn, _ = self.listener.accept()
            self.listener.close()
            os.unlink(self.path)
            started = time.monotonic()
            self.conn = conn
            thread = self.thread = threading.Thread(target=self._serve, name="pycr-fault-server", daemon=True)
            thread.start()
            try:
                went = self.went = self._talk(conn)
            finally:
                self.conn = None
                conn.close()
            if not went:
                self.server.stop()
                thread.join()
                if self.error is not None:
                    raise PycrError(f"lazy-pages: serving pages failed: {self.error}; the restore was stopped")
                raise PycrError("lazy-pages: the restore failed before its tree ran; nothing left to serve")
            self.server.finish_input()
            thread.join()
            seconds = time.monotonic() - started     # the last page placed (not the source's end after it)
            left = self.server.stats()["left"]
            error = self.error or self.source.failure() or (f"stopped with {left} pages missing" if left else None)
            if error is not None:
                raise PycrError(f"lazy-pages: serving pages failed: {error}; the restored tree was killed")
            self.dog.release()
            self.dog = None
            self.source.finished()
            return self._summary(seconds)
        finally:
            if self.dog is not None:            # not every page placed: the tree must not run on
                # every task's exit seen: the source is the one copy. A replica that never ran (the restore
                # failed before "go") is no news to the source: the destination's ERROR says why it failed.
                if self.dog.kill() and self.went:
                    self.gone_untold = not self.source.replica_gone()
            if self.server is not None and self.thread is not None and self.thread.is_alive():   # Ctrl-C
                self.server.stop()
                self.thread.join()
            self.source.close()
            if self.server is not None:
                self.server.close()
            if self.listener is not None:
                self.listener.close()
                with contextlib.suppress(FileNotFoundError):
                    if started is None:
                        os.unlink(self.path)

    def _serve(self):
        try:
            self.server.serve()
        except OSError as exc:
            self.error = exc.strerror or str(exc)
            log.warning("lazy-pages: %s", self.error)
            conn = self.conn
            if conn is not None:            # a restore still talking: end it, the tree is killed
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def _talk(self, conn):
        """The restore's messages until "go" (-> True) or the end of the connection (-> False)."""
        while True:
            msg, fds = protocol.recv(conn)
            if msg is None:
                return False
            try:
                reply = self._handle(msg, fds)
            except PycrError as exc:
                protocol.send(conn, {"ok": False, "error": str(exc)})
                continue
            finally:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            protocol.send(conn, {"ok": True})
            if reply == "go":
                return True

    def _handle(self, msg, fds):
        op = msg.get("op")
        if op == "hello":
            if msg.get("set_id") != self.source.set_id:
                raise PycrError("the restore reads another image set than the one this daemon serves")
            return op
        if op == "process":
            if len(fds) != 2:
                raise PycrError("a process message needs its userfaultfd and pidfd")
            uffd, pidfd = fds
            runs = self.source.runs(int(msg["pid"]), [(int(s), int(e), bool(w)) for s, e, w in msg["runs"]])
            self.dog.hold(pidfd, uffd)
            self.server.add(os.dup(uffd), runs)
            log.info("lazy-pages: pid %s (real %s): %d runs, %d pages to serve", msg["pid"], msg.get("real"),
                     len(runs), sum(r[1] for r in runs) // PAGE)
            return op
        if op == "go":
            self.source.resuming()          # a remote source commits: from here it never thaws
            if self.push_delay:
                self.server.push_from(time.monotonic_ns() + int(self.push_delay * 1e9))
            return op
        raise PycrError(f"unknown message {op!r}")

    def _summary(self, seconds):
        st = self.server.stats()
        times = self.server.fault_times()
        return Summary(st["faults"], st["fault_pages"], st["pushed_pages"], st["zero_pages"], st["dropped"],
                       st["forks"], seconds, statistics.median(times) / 1000 if times else 0.0,
                       _percentile(times, 0.99), self.source.summary())


def lazy_pages(images_dir, work_dir=None, on_listening=None, page_server=None):
    """Serve one lazy restore of images_dir -> Summary. page_server: (address, port, auth.Credentials)
    of a lazy dump's source (`dump --lazy-pages`), which then sends the pages."""
    source = None
    if page_server is not None:
        from .remote import RemotePages
        source = RemotePages(images_dir, *page_server)
    return Daemon(images_dir, work_dir or images_dir, source).run(on_listening)
