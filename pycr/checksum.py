"""Checksums of image files: BLAKE2b-128 of headered images, CRC-32C per MiB of pages.

Pages files are large and written by the C core straight from the buffer it
read the task into, so their checksum is computed there, a chunk at a time
(`ChunkSums`), instead of reading gigabytes back. Small images are hashed
whole in Python from the bytes being written.
"""

import hashlib
import os

from .native.core import ChunkSums

#: Bytes of a pages file covered by one CRC-32C: small enough to say where a
#: corruption is, large enough that a 2 GiB file has only 2048 sums.
PAGES_CHUNK = 1 << 20
DIGEST_SIZE = 16


def digest(data):
    """BLAKE2b-128 of bytes: the checksum of a headered image (and of the manifest)."""
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


def pages_sums(path, chunk=PAGES_CHUNK):
    """array('I') of the CRC-32C of every chunk of the file at path, read in C."""
    fd = _open_direct(path)
    try:
        size = os.fstat(fd).st_size
        sums = ChunkSums(chunk)
        sums.update_from_fd(fd, 0, size)
        return sums.sums()
    finally:
        os.close(fd)


def _open_direct(path):
    """O_DIRECT where the filesystem has it: a verification pass need not fill the page cache."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
    except OSError:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


class PagesFile:
    """The file object a pages writer hands out: every byte written is summed.

    Python writes go through the buffered file; fileno() flushes it first, so
    that the C core or os.write may then write to the fd directly, passing
    `sums` along (core.vm_read_runs does).
    """

    def __init__(self, f, chunk=PAGES_CHUNK):
        self._f = f
        self.sums = ChunkSums(chunk)

    def write(self, data):
        self.sums.update(data)
        return self._f.write(data)

    def write_fd(self, data):
        """os.write all of data to the fd (after a flush), summed."""
        fd = self.fileno()
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        self.sums.update(data)

    def fileno(self):
        self._f.flush()
        return self._f.fileno()

    def tell(self):
        return os.lseek(self.fileno(), 0, os.SEEK_CUR)

    def truncate(self, pos):
        """Cut the file back to pos bytes and write on from there (a batch copied again)."""
        fd = self.fileno()
        os.lseek(fd, pos, os.SEEK_SET)
        os.ftruncate(fd, pos)

    def drain(self):
        """Nothing to do: bytes written to fileno() are in the file already (see RemotePagesFile)."""

    def flush(self):
        self._f.flush()
