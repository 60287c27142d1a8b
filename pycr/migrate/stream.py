"""Applying an image set to the replica while its pages still arrive (`pycr serve`).

A pass's set comes over the network with every process's pages file last
(pycr.net.image_sets). Once everything else is in, begin() checks it all as
any restore does (load_images: the manifest, each file's checksum, the
chain; the pages files still on their way are taken at the sizes the
manifest lists) and brings the replica up to the point where the pass's own
pages go in (Replica.begin: tasks killed or forked, layouts, shared
objects). Each pages file then goes straight from the receive buffer into
its task with process_vm_writev, one checksum chunk (1 MiB) at a time: a
chunk is written only after its CRC-32C matched the manifest's. A copy of
each chunk also goes to the set's pages file, so the set on disk is whole,
as before: later passes resolve in_parent runs from it (ranges mapped anew,
tasks forked again), and nothing reads it back in the usual path.

A chunk that does not match fails the pass: the replica, which now holds
part of it, is a stopped tree that never ran; it is killed (follow() discards
it), and the source, told by the destination's ERROR, thaws and runs on
(docs/trust.md, "Migration between two hosts").

The first set is streamed the same way into tasks laid out from its small
images (restore.mm.prepare); a lazy set (post-copy, hybrid's final) lands
whole, as the lazy-pages daemon serves it from disk.
"""

import bisect
import os
from array import array

from pycr import manifest
from pycr.errors import ImageError
from pycr.images import ImageDir, classify_name, is_process_pages
from pycr.log import log
from pycr.manifest import ArrivingCheck
from pycr.migrate import pages as pages_mod
from pycr.restore.load import load_images
from pycr.sysinfo import page_size

PAGE = page_size()


class PassStream:
    """One pass of follow(), offered to a transport that can stream (NetworkTransport).

    The transport calls begin(path) when the first process's pages file is about to
    arrive, with every other file of the set in path; `staged` is then set (follow()
    completes the pass from it)."""

    def __init__(self, replica, trust_images=False):
        self.replica = replica
        self.trust_images = trust_images
        self.staged = None

    def begin(self, path):
        """-> ArrivingPages that take the rest of the set, or None: let it land whole (a lazy set,
        or a set whose other files are not all here yet, as an older source sends them)."""
        try:
            man = manifest.read(path)   # load_images checks it, and all it lists, below
        except ImageError:
            return None
        def here(name):
            return os.path.lexists(os.path.join(path, name))

        if not all(here(e.name) for e in man.files if not is_process_pages(e.name)):
            return None
        if str(ImageDir(path).read("inventory").kind) == "lazy-dump":
            return None
        arriving = sorted(e.name for e in man.files if is_process_pages(e.name) and not here(e.name))
        images = load_images(path, allow_pre_dump=True, resolve_chain=self.replica.run is None,
                             trust_images=self.trust_images, arriving=arriving)
        self.staged = self.replica.begin(images)
        return ArrivingPages(self.replica, self.staged, path, man, arriving)


class ArrivingPages:
    """The process pages files of one set, as they arrive: file(name, size) for each."""

    def __init__(self, replica, staged, path, man, arriving):
        self.replica, self.staged, self.path = replica, staged, path
        self.manifest = man
        self.waiting = set(arriving)
        self.bytes = 0
        self.files = 0

    def file(self, name, size):
        """-> ArrivingFile for pages file `name` of `size` bytes (its SET_FILE)."""
        where = os.path.join(self.path, name)
        if name not in self.waiting:
            raise ImageError(where, "arrived, but manifest.img does not list it as one of the pages files to come "
                                    "(or it came twice)")
        self.waiting.discard(name)
        check = ArrivingCheck(where, self.manifest, name)
        if size != check.entry.size:
            raise ImageError(where, f"announced with {size} bytes, manifest.img says {check.entry.size}")
        owner = str(classify_name(name).key)
        if owner not in self.staged.targets:
            raise ImageError(where, f"corrupt: pages of pid {owner}, which is not a process of this set")
        runs = pages_mod.delta_runs(self.staged.images.pages, owner)
        return ArrivingFile(self, owner, runs, where, check)

    def close(self):
        """Every pages file the manifest lists has arrived whole."""
        if self.waiting:
            raise ImageError(os.path.join(self.path, min(self.waiting)),
                             "missing: manifest.img lists it, the source did not send it")
        log.info("pass %s: %d pages files (%d pages) written into the replica as they arrived, each MiB "
                 "checked first", os.path.basename(self.path), self.files, self.bytes // PAGE)


class ArrivingFile:
    """One pages file: bytes in file order -> checked chunks -> the task, and the file on disk."""

    def __init__(self, parent, owner, runs, where, check):
        self.parent, self.owner, self.where, self.check = parent, owner, where, check
        self.runs = runs                # the pagemap's level-0 runs, back to back in the file
        self.offsets = []               # file offset of each run
        at = 0
        for i in range(0, len(runs), 2):
            self.offsets.append(at)
            at += runs[i + 1]
        self.partial = bytearray()      # a chunk begun in one frame, to be ended in the next
        self.at = 0                     # file offset of the next chunk
        self.fd = os.open(where, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)

    def write(self, data):
        """The next bytes of the file (any length)."""
        view = memoryview(data)
        size = self.check.chunk
        while view:
            if not self.partial and len(view) >= size:
                self._chunk(view[:size])            # a whole chunk in one frame: no copy
                view = view[size:]
                continue
            take = min(size - len(self.partial), len(view))
            self.partial += view[:take]
            view = view[take:]
            if len(self.partial) == size:
                self._chunk(memoryview(self.partial))
                self.partial = bytearray()

    def zeros(self, n):
        """n bytes of zeros (a hole in the file as sent)."""
        while n:
            piece = min(n, self.check.chunk)
            self.write(bytes(piece))
            n -= piece

    def close(self):
        """The last bytes are in: check and write the short last chunk; the file is whole."""
        try:
            if self.partial:
                self._chunk(memoryview(self.partial))
                self.partial = bytearray()
            if not self.check.done():
                raise ImageError(self.where, f"truncated: {self.check.size} bytes arrived, manifest.img "
                                             f"says {self.check.entry.size}")
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)    # what is written back leaves the cache
        finally:
            os.close(self.fd)
            self.fd = -1
        self.parent.files += 1
        self.parent.bytes += self.check.size

    def abort(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _chunk(self, data):
        """One chunk: checked against the manifest, then into the task and onto disk."""
        self.check.check(data)
        n = len(data)
        runs = self._runs(self.at, n)
        if runs:
            self.parent.replica.write_pages(self.parent.staged, self.owner, runs, data)
        done = 0
        try:
            while done < n:
                done += os.write(self.fd, data[done:])
            # not read back (but by a later pass that maps a range anew): its writeback starts now,
            # spread over the pass, rather than in one burst the kernel may start in a later pass
            os.posix_fadvise(self.fd, self.at, n, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            raise ImageError(self.where, f"cannot write it: {exc.strerror}") from None
        self.at += n

    def _runs(self, lo, n):
        """The runs of file bytes [lo, lo + n), clipped, as an array for vm_write_runs."""
        hi = lo + n
        out = array("Q")
        i = max(bisect.bisect_right(self.offsets, lo) - 1, 0)
        while i < len(self.offsets) and self.offsets[i] < hi:
            start, length = self.offsets[i], self.runs[2 * i + 1]
            a, b = max(start, lo), min(start + length, hi)
            if a < b:
                out.extend((self.runs[2 * i] + (a - start), b - a))
            i += 1
        return out
