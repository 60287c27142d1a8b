"""Checksums of image files: BLAKE2b-128 of headered images, CRC-32C per MiB of pages.

Pages files are large and written by the C core straight from the buffer it
read the task into, so their checksum is computed there, a chunk at a time
(`ChunkSums`), instead of reading gigabytes back. Small images are hashed
whole in Python from the bytes being written.
"""

import array
import hashlib
import os
import threading

from .native.core import ChunkSums

#: Bytes of a pages file covered by one CRC-32C: small enough to say where a
#: corruption is, large enough that a 2 GiB file has only 2048 sums.
PAGES_CHUNK = 1 << 20
DIGEST_SIZE = 16


def digest(data):
    """BLAKE2b-128 of bytes: the checksum of a headered image (and of the manifest)."""
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


#: Verification reads: several preads in flight, each of a few MiB. One O_DIRECT pread at
#: a time leaves the device idle while pycr sums, and the virtual disks pycr runs on serve
#: a queue of reads faster than one large read (benchmarks/verify_reads.py).
VERIFY_THREADS = 4
VERIFY_READ = 2 << 20
VERIFY_PIECE = 32 << 20
VERIFY_SMALL = 8 << 20


def pages_sums(path, chunk=PAGES_CHUNK, threads=VERIFY_THREADS):
    """array('I') of the CRC-32C of every chunk of the file at path, read in C."""
    return sums_of_files([path], chunk, threads)[0]


def sums_of_files(paths, chunk=PAGES_CHUNK, threads=VERIFY_THREADS):
    """[pages_sums(path) for path in paths], every file cut into pieces of whole chunks
    and the pieces of all files summed by `threads` threads at once (the C core releases
    the GIL), each thread through its own small buffer.

    Files of at most VERIFY_SMALL bytes in all are read through the page cache in this
    thread: they are usually just written (a migration's pass), and an O_DIRECT read of
    them would first wait for their writeback and then read the device, while new
    threads would each fault in a buffer of their own."""
    piece = max(chunk, VERIFY_PIECE // chunk * chunk)
    small = sum(_size(path) for path in paths) <= VERIFY_SMALL
    if small:
        threads = 1
    fds = []
    try:
        work = []                       # (file index, fd, offset, length), in file order
        for i, path in enumerate(paths):
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC) if small else _open_direct(path)
            fds.append(fd)
            size = os.fstat(fd).st_size
            work += [(i, fd, at, min(piece, size - at)) for at in range(0, size, piece)] or [(i, fd, 0, 0)]
        if threads <= 1 or len(work) <= 1:
            parts = [_sum_piece(fd, chunk, at, n) for _, fd, at, n in work]
        else:
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(min(threads, len(work))) as pool:
                parts = list(pool.map(lambda w: _sum_piece(w[1], chunk, w[2], w[3]), work))
        out = [array.array("I") for _ in paths]
        for (i, _fd, _at, _n), part in zip(work, parts):
            out[i].extend(part)
        return out
    finally:
        for fd in fds:
            os.close(fd)


_buffers = threading.local()


def _sum_piece(fd, chunk, offset, length):
    """CRC-32C sums of `length` bytes of fd from offset (a multiple of chunk), through
    this thread's verification buffer (made once per thread: a cold buffer is slow)."""
    from .native.core import Copier
    copier = getattr(_buffers, "copier", None)
    if copier is None:
        copier = _buffers.copier = Copier(VERIFY_READ)
    sums = ChunkSums(chunk)
    copier.sum_fd(sums, fd, offset, length)
    return sums.sums()


def _size(path):
    try:
        return os.stat(path).st_size
    except OSError:
        return 0            # the open below says why


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
        self.direct = True          # the page copy may bypass the page cache (ImageDir.pages_writer)

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
