"""inotify: a new instance in pycr, its watches added again with the same watch descriptors.

The kernel hands wds out cyclically (idr_alloc_cyclic from 1): the next add
gets the number after the last one given, even if that watch was removed
since. So pycr walks a fresh instance up to each dumped wd, in increasing
order, by adding and removing a watch on a directory of its own, then adds
the real watch, which gets exactly that wd. The IN_IGNORED events of those
removals are read off before any task gets the instance (with them goes any
event of the restore window, which falls in the downtime, like those between
the dump and the restore).
"""

import ctypes
import os
import tempfile

from pycr import abi
from pycr.abi import NR
from pycr.errors import ImageError, RestoreError
from pycr.log import log
from pycr.native import core
from pycr.restore.kindparts import entries_by_file, ready_for_task

TYPE = "inotify"
IMAGE = "inotify"
MAX_WALK = 1 << 20          # add/remove pairs pycr makes to reach a wd
WD_MAX = 2**31 - 1


def check(path, body, recs):
    entries_by_file(path, body.inotifies, recs, "inotify")
    for e in body.inotifies:
        wds = [w.wd for w in e.watches]
        if wds != sorted(set(wds)) or any(not 0 < wd <= WD_MAX for wd in wds):
            raise ImageError(path, f"corrupt: inotify {e.file_id} has watch descriptors {wds}")
        for w in e.watches:
            if w.mask & ~abi.IN_ALL_WATCH_BITS or not w.path.startswith("/"):
                raise ImageError(path, f"corrupt: inotify {e.file_id} wd {w.wd}: mask {w.mask:#x}, path {w.path!r}")


def add_watch(fd, path, mask):
    name = ctypes.create_string_buffer(os.fsencode(path))
    return core.syscall(NR["inotify_add_watch"], fd, ctypes.addressof(name), mask)


def drain(fd):
    """Read every queued event off pycr's instance: the bytes read."""
    n = 0
    while True:
        try:
            got = os.read(fd, 65536)
        except BlockingIOError:
            return n
        n += len(got)


class Objects:
    def __init__(self, images, body):
        self.entries = {e.file_id: e for e in body.inotifies}
        self.spare = None

    def _spare(self):
        """A directory of pycr's own whose watch moves the wd cursor along."""
        if self.spare is None:
            self.spare = tempfile.TemporaryDirectory(prefix="pycr-inotify-")
        return self.spare.name

    def open(self, rec):
        e = self.entries[rec.file_id]
        return ready_for_task(core.syscall(NR["inotify_init1"], os.O_CLOEXEC | os.O_NONBLOCK), rec,
                              lambda fd: self._watch_all(fd, e))

    def _watch_all(self, fd, e):
        """Add e's watches to pycr's instance fd at their wds, then read off the walk's events."""
        after = 0                   # the last wd handed out by this instance
        for w in e.watches:
            if w.wd - after - 1 > MAX_WALK:
                raise RestoreError(f"inotify wd {w.wd}: more than {MAX_WALK} watch descriptors to walk past")
            while after + 1 < w.wd:
                after = add_watch(fd, self._spare(), abi.IN_ATTRIB)
                core.syscall(NR["inotify_rm_watch"], fd, after)
            try:
                st = os.stat(w.path, follow_symlinks=False)
            except OSError as exc:
                raise RestoreError(f"inotify wd {w.wd}: {w.path}: {exc.strerror}") from None
            if (st.st_dev, st.st_ino) != (w.dev, w.ino):
                raise RestoreError(f"inotify wd {w.wd}: {w.path} is another file than the one watched at the dump")
            try:
                got = add_watch(fd, w.path, w.mask | abi.IN_DONT_FOLLOW)
            except OSError as exc:
                raise RestoreError(f"inotify wd {w.wd}: inotify_add_watch {w.path}: {exc.strerror}") from None
            if got != w.wd:
                raise RestoreError(f"inotify: {w.path} got wd {got}, not {w.wd}")
            after = got
        if e.watches:
            log.info("inotify %d: %d watch(es) added back, wds %s", e.file_id, len(e.watches),
                     [w.wd for w in e.watches])
        drain(fd)

    def close(self):
        if self.spare is not None:
            self.spare.cleanup()
            self.spare = None
