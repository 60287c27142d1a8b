"""The dump's side of criu's page server: pages files go over the channel instead of to disk.

`PageServerClient.connect()` connects (TLS if asked) and authenticates
before the dump freezes anything. The dump's ImageDir then hands out a
RemotePagesFile for every pages-<owner>.img (ImageDir.pages_sink): the same
interface as checksum.PagesFile, so the copy paths (collect/memory.py,
trackers/) do not know where the bytes go. The native core writes each
batch of runs into a staging memfd (its fast path wants an fd); drain()
sends the batch as DATA frames. Every byte is summed on the way as for a
local file, and those sums go into this dump's manifest: once the server's
files are copied next to the rest of the set, restore checks them exactly
as for a local dump. The server checks them too before it acknowledges a
file (FILE_OK), and keeps the files only once the dump says DONE.

All of this happens while the tree is frozen, so no wait here is longer than
the frame timeout (PYCR_NET_TIMEOUT), not even for FILE_OK or DONE_OK (a
server whose disk takes longer to fsync one file fails the dump: the tree
then goes on, the safe side). After a failure nothing more is said to the
server until the dump has thawed the tree: abort() comes after the thaw and
has a short deadline of its own.
"""

import contextlib
import os

from ..checksum import PAGES_CHUNK
from ..formats.wire import FrameType, Role
from ..log import log
from ..native.core import ChunkSums
from ..stats import count, phase
from . import auth, channel as ch

#: Seconds a FILE_CANCEL or ABORT may take to leave: the server may be the one that stalls.
GOODBYE_PATIENCE = 2.0

#: Bytes staged by Python writes (hash tracker, shared memory) before they are sent.
STAGE_LIMIT = 4 << 20


class RemotePagesFile:
    """A pages file being written to the page server: write(), write_fd(), fileno()
    + drain(), tell(), truncate(), sums (see checksum.PagesFile)."""

    def __init__(self, channel, name, chunk=PAGES_CHUNK):
        self.channel = channel
        self.name = name
        self.sums = ChunkSums(chunk)
        self._stage = os.memfd_create(f"pycr-{name}", os.MFD_CLOEXEC)
        self._base = 0              # file offset of the staging memfd's first byte

    def close(self):
        """Release the staging memfd; tell() still gives the size."""
        if self._stage >= 0:
            self._base = self.tell()
            os.close(self._stage)
            self._stage = -1

    def fileno(self):
        """The staging fd, positioned where the next byte goes; call drain() after writing to it."""
        return self._stage

    def write(self, data):
        self.sums.update(data)
        _write_all(self._stage, data)
        if self._staged() >= STAGE_LIMIT:
            self.drain()
        return len(data)

    write_fd = write

    def flush(self):
        pass

    def _staged(self):
        return os.lseek(self._stage, 0, os.SEEK_CUR)

    def tell(self):
        return self._base + (self._staged() if self._stage >= 0 else 0)

    def truncate(self, pos):
        """Cut the file back to pos bytes (a batch that is copied again another way)."""
        if pos >= self._base:
            os.lseek(self._stage, pos - self._base, os.SEEK_SET)
            return
        self.channel.send(FrameType.TRUNCATE, {"offset": pos}, f"{self.name}'s truncation")
        self._base = pos
        os.lseek(self._stage, 0, os.SEEK_SET)

    def drain(self):
        """Send what is staged as DATA frames; the memfd is then reused from its start."""
        staged = self._staged()
        if not staged:
            return
        with phase("page server send"):
            off = 0
            while off < staged:
                piece = os.pread(self._stage, min(staged - off, 1 << 20), off)
                self.channel.send_data(piece, f"{self.name}")
                off += len(piece)
        self._base += staged
        os.lseek(self._stage, 0, os.SEEK_SET)
        count("bytes sent to the page server", staged)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class PageServerClient:
    """One authenticated connection to `pycr page-server` for one dump or pre-dump."""

    def __init__(self, channel):
        self.channel = channel
        self.files = 0
        self.bytes = 0
        self.done = False

    @classmethod
    def connect(cls, host, port, creds):
        """Connect (TLS if creds.tls), hello, authenticate with creds (auth.Credentials, read first)."""
        return cls(auth.connect(host, port, "page server", Role.PAGE_CLIENT, {Role.PAGE_SERVER}, creds))

    @property
    def name(self):
        return self.channel.name

    @contextlib.contextmanager
    def pages_file(self, name):
        """A RemotePagesFile for `name`; on leaving the block the server makes it durable and checks
        its sums (FILE_OK). A block that fails drops the file on the server."""
        self.channel.send(FrameType.FILE_BEGIN, {"name": name})
        out = RemotePagesFile(self.channel, name)
        try:
            yield out
            out.drain()
            size = out.tell()
            if size != out.sums.pos:
                raise AssertionError(f"{name}: {size} bytes sent but {out.sums.pos} summed")
            self.channel.send(FrameType.FILE_END, {"size": size, "chunk_size": PAGES_CHUNK,
                                                   "sums": out.sums.sums().tobytes()})
            self.channel.recv(FrameType.FILE_OK)
        except BaseException as exc:
            if not isinstance(exc, (ch.NetError, OSError, KeyboardInterrupt)):
                with contextlib.suppress(ch.NetError, OSError):
                    self.channel.send(FrameType.FILE_CANCEL, {"name": name}, patience=GOODBYE_PATIENCE)
            raise
        finally:
            out.close()
        self.files += 1
        self.bytes += size
        log.info("%s: %s is written there (%d bytes, CRC-32C checked by the server)", self.name, name, size)

    def commit(self):
        """Every pages file is sent: the server keeps them (before this dump seals its set)."""
        self.channel.send(FrameType.DONE, {})
        self.channel.recv(FrameType.DONE_OK)
        self.done = True
        log.info("%s: keeps the %d pages files (%d bytes) of this dump", self.name, self.files, self.bytes)

    def abort(self, reason=""):
        """The dump failed: the server removes what it wrote for it. Never raises, never waits
        more than GOODBYE_PATIENCE (nothing is sent on a broken channel)."""
        if not self.done:
            with contextlib.suppress(ch.NetError, OSError, ValueError):
                self.channel.send(FrameType.ABORT, {"reason": reason}, patience=GOODBYE_PATIENCE)
        self.close()

    def lost(self, exc):
        """True if exc is this server failing or going away (not another failure of the dump)."""
        return isinstance(exc, ch.NetError) and str(exc).startswith(self.name)

    def close(self):
        self.channel.close()
