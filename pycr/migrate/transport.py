"""Where the image sets of an incremental restore come from, one pass at a time.

The destination loop only asks `next_image_set()` for the path of the next
complete image set and tells `finish(ok)` how it ended, so the same loop runs
over a directory (`pycr restore --follow`), beside an in-process source
(`pycr migrate`), or over a socket between two machines (pycr.net.serve).

An image set is complete once its manifest.img exists (pycr writes it last;
load_images then checks it lists exactly what is there).
The next set is the one whose inventory names the previous one as parent, so
pass directories may have any names and appear in any order.
"""

import os
import time

from pycr.errors import ImageError, PycrError
from pycr.images import ImageDir, not_a_directory
from pycr.log import log


class Transport:
    """The interface: a source of image sets for one incremental restore."""

    #: True if next_image_set shows the pass's progress bar itself (it copies the pages
    #: in this process); then applying the set to the replica shows none.
    shows_progress = False

    #: The restore.lazy.LazyLink of the set next_image_set just gave, if its private anonymous pages
    #: are served on fault (the final set of a post-copy or hybrid migration), else None.
    lazy_link = None

    def next_image_set(self, stream=None):
        """Path of the next complete image set (blocks until there is one).

        stream: a migrate.stream.PassStream. A transport that receives the set piece by piece
        may call stream.begin(path) once everything but the processes' pages files is in, and
        send those through what it returns (into the replica as they arrive); follow() then
        completes the pass from stream.staged. Others ignore it: the set lands whole."""
        raise NotImplementedError

    def commit(self, replica):
        """The final set is applied: the replica is complete and stopped. Return once it may
        run (the source is gone); raise to discard it. Locally there is nothing to wait for."""

    def finish(self, ok):
        """The restore ended: ok=True once the replica runs, False if it was discarded."""

    def close(self):
        """Release whatever the transport holds."""


class DirectoryTransport(Transport):
    """Pass directories appearing one by one under `top` (`pycr restore -D TOP --follow`)."""

    def __init__(self, top, timeout=300.0, poll=0.02):
        self.top = os.fspath(top)
        self.timeout = timeout
        self.poll = poll
        self.previous = None        # realpath of the last set handed out

    def _parent_of(self, path):
        """realpath of the parent named by path's inventory ('' for a chain start)."""
        inventory = ImageDir(path).read("inventory")
        if not inventory.parent:
            return ""
        return os.path.realpath(os.path.join(path, inventory.parent))

    def _candidates(self):
        try:
            names = sorted(os.listdir(self.top))
        except FileNotFoundError:
            raise ImageError(self.top, not_a_directory(self.top)) from None
        except OSError as exc:
            raise ImageError(self.top, f"cannot list the image sets: {exc.strerror}") from None
        for name in names:
            path = os.path.join(self.top, name)
            if os.path.isfile(os.path.join(path, "manifest.img")):
                yield path

    def next_image_set(self, stream=None):
        want = self.previous or ""
        deadline = time.monotonic() + self.timeout
        while True:
            for path in self._candidates():
                real = os.path.realpath(path)
                if real == self.previous:
                    continue
                if self._parent_of(path) == want:
                    self.previous = real
                    log.info("next image set: %s", path)
                    return path
            if time.monotonic() >= deadline:
                after = f"after {self.previous}" if self.previous else "to start from"
                raise PycrError(f"{self.top}: no image set {after} appeared within {self.timeout:g} s")
            time.sleep(self.poll)
