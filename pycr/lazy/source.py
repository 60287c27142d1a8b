"""Where the fault server's pages come from.

A PageSource gives the server its files (fd, size, one CRC-32C per chunk) and,
for a task, the saved runs inside the ranges the restore registered, as
(start, length, file index, file offset, flags). Today's source is the local
pages files of an image set and its pre-dump chain (LocalPages); a network
source would hand the server its chunks the same way, by (file, chunk).
"""

import os
from array import array

from .. import manifest
from ..errors import ImageError
from ..images import ImageDir
from ..native.core import FaultServer
from ..restore.memory import PageChain


class PageSource:
    """The interface the daemon uses."""
    set_id = ""         # hex ID of the image set served: a restore of another set is refused
    chunk = 0           # bytes per checksum

    def files(self):
        """[(fd, size, array('I') sums)]: the server reads whole chunks and checks each."""
        raise NotImplementedError

    def runs(self, pid, ranges):
        """Saved runs of pid inside ranges [(start, end, wipe_on_fork)], sorted by start."""
        raise NotImplementedError

    def remote(self):
        """(request fd, arrived eventfd) of a source whose chunks come later (faults.c), else None."""
        return None

    def attach(self, server):
        """The fault server exists (a remote source starts fetching)."""

    def resuming(self):
        """The tree is about to run (a remote source's commit point); PycrError refuses it."""

    def finished(self):
        """Every page is placed."""

    def replica_gone(self):
        """The restored tree is surely dead (killed by the watchdog, every task's exit seen): a
        remote source may run its own tree again. -> whether the source heard it (a local one has
        no tree to run)."""
        return True

    def failure(self):
        """Why the source failed, or None."""
        return None

    def summary(self):
        """More words for the daemon's summary line."""
        return ""

    def close(self):
        pass


class LocalPages(PageSource):
    """The pages files of the image set at images_dir (and its chain), each opened once."""

    def __init__(self, images_dir):
        chain = manifest.verify_chain(images_dir, deep=False)     # sizes, the manifests' own digests
        if str(ImageDir(images_dir).read("inventory").kind) == "lazy-dump":
            raise ImageError(images_dir, "a lazy dump: its anonymous pages are at its source, not here; serve "
                                         "it with `pycr lazy-pages --page-server --address A --port P`")
        self.set_id = bytes(chain[0][1].set_id).hex()
        chunks = {man.chunk_size for _, man in chain}
        if len(chunks) != 1:
            raise ImageError(images_dir, "corrupt: the sets of the chain use different checksum chunks")
        self.chunk = chunks.pop()
        imgdir = ImageDir(images_dir)
        self.pages = PageChain(imgdir)
        self._manifests = {os.path.realpath(d): man for d, man in chain}
        self._pids = [p.pid for p in imgdir.read("pstree").processes]
        self._files, self._index = [], {}
        try:
            for pid in self._pids:
                for level in range(len(chain)):
                    self._open(level, str(pid))
        except BaseException:
            self.close()
            raise

    def _open(self, level, owner):
        try:
            d = self.pages.dir(level)
        except ImageError:
            return
        path = d.pages_path(owner)
        man = self._manifests.get(os.path.realpath(d.path))
        entry = next((e for e in man.files if e.name == os.path.basename(path)), None) if man else None
        if entry is None:
            return
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        if os.fstat(fd).st_size != entry.size:
            os.close(fd)
            raise ImageError(path, f"truncated or edited: manifest.img says {entry.size} bytes")
        self._index[(level, owner)] = len(self._files)
        self._files.append((fd, entry.size, array("I", bytes(entry.sums))))

    def files(self):
        return list(self._files)

    def runs(self, pid, ranges):
        owner = str(pid)
        if pid not in self._pids:
            raise ImageError(self.pages.dirs[0].path, f"pid {pid} is not in this image set")
        out = []
        for start, end, wipe in ranges:
            flags = FaultServer.WIPEONFORK if wipe else 0
            for level, addr, length, offset in self.pages.pieces(owner, start, end):
                index = self._index.get((level, owner))
                if index is None:
                    raise ImageError(self.pages.dir(level).pages_path(owner), "missing from its manifest")
                out.append((addr, length, index, offset, flags))
        out.sort()
        return out

    def close(self):
        for fd, _, _ in self._files:
            os.close(fd)
        self._files = []
        self.pages.close()
