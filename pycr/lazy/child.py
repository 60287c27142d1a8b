"""The lazy-pages daemon of a migration's destination, in a child process of `pycr serve`.

`pycr migrate --mode post-copy|hybrid` ends with a final set whose private
anonymous pages stay in the frozen source tree. `pycr serve` then runs what a
user of `pycr lazy-pages --page-server` + `pycr restore --lazy-pages` runs:
the same Daemon with the same RemotePages, forked before the replica is
finished (a process of its own, as the daemon's watchdog needs: forked while
it has no threads), and restores through the same LazyLink. Its pages come
over the migration's own connection, which the child owns from the fork on
(lazy/migration_link.py). The child says on a pipe when it listens, and at
the end its figures (one JSON line).
"""

import contextlib
import json
import os
import select
import signal

from ..log import log
from ..restore.lazy import LazyLink


class DaemonChild:
    def __init__(self, images_dir, work_dir, link):
        """link: the migration_link.MigrationLink the daemon gets its pages through; `self.channel`
        is then what this process keeps of the migration's connection (a ParentEnd)."""
        r, w = os.pipe2(os.O_CLOEXEC)
        self.pid = os.fork()
        if self.pid == 0:               # the daemon
            code = 1
            try:
                os.close(r)
                link.in_child()
                code = _run(images_dir, work_dir, link, w)
            finally:
                os._exit(code)
        os.close(w)
        self.channel = link.in_parent()
        self.pipe = os.fdopen(r, "r")
        self.link = None
        self.result = None
        first = self.pipe.readline()
        if first.strip() != "listening":
            self.wait(first)
            raise_from = self.result.get("error", "it exited") if self.result else "it exited"
            from ..errors import PycrError
            raise PycrError(f"the lazy-pages daemon did not start: {raise_from}")
        self.link = LazyLink(images_dir, work_dir)

    def wait(self, line=None):
        """The daemon's figures once it is done (every page placed, or it failed) -> dict. line: their
        line, when it came instead of "listening"."""
        if self.result is None:
            line = self.pipe.readline() if line is None else line
            self.pipe.close()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            try:
                self.result = json.loads(line) if line.strip() else {"error": "the daemon died"}
            except ValueError:
                self.result = {"error": "the daemon died"}
        return self.result

    def stop(self, signum):
        """serve was told to stop after the commit: the daemon gets the same signal (as it would
        from a Ctrl-C to the group) and ends as it then does; wait for it."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)
        self.wait()

    def kill(self, why=None, patience=5.0):
        """A failed restore: the daemon (and its watchdog, which kills what it holds) end. why: the
        reason, which the daemon sends the source (ERROR) before it ends (given `patience` s)."""
        if why is not None:
            self.channel.error(why)     # before the restore's link closes: the daemon reads it first
        if self.link is not None:
            self.link.close()
        if why is not None and self.result is None and select.select([self.pipe], [], [], patience)[0]:
            self.wait()
        self.channel.close()
        if self.result is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.wait()


def _run(images_dir, work_dir, link, w):
    from ..errors import PycrError
    from .daemon import Daemon
    from .remote import RemotePages
    out = os.fdopen(w, "w")
    source = daemon = None
    try:
        source = RemotePages(images_dir, chain_ok=True, dialer=link)
        daemon = Daemon(images_dir, work_dir, source)
        summary = daemon.run(on_listening=lambda _path: (out.write("listening\n"), out.flush()))
    except (PycrError, OSError) as exc:
        log.warning("%s", exc)
        figures = {"error": str(exc)}
        if daemon is not None and daemon.gone_untold:
            figures["gone_untold"] = source.set_id      # serve tells a source that comes back (net/gone.py)
    else:
        figures = {"faults": summary.faults, "fault_pages": summary.fault_pages,
                   "pushed_pages": summary.pushed_pages, "zero_pages": summary.zero_pages,
                   "seconds": summary.seconds, "median_us": summary.median_us,
                   "p99_us": summary.p99_us, "bytes": source.received,
                   "pushed_bytes": source.pushed_bytes, "line": summary.line()}
    link.finish(figures, committed=source is not None and source.committed)
    out.write(json.dumps(figures) + "\n")
    out.flush()
    return 1 if "error" in figures else 0
