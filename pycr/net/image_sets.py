"""Moving one image set (one pass of a migration) over the channel.

The source sends SET_BEGIN, then for every file of the set directory a
SET_FILE (name, size) followed by exactly `size` bytes in DATA frames, then
SET_END (files and bytes counted). The files go in this order: the small
images (manifest included), then the pages files of shared objects, then
those of the processes, so that the destination has everything but the
processes' pages when those begin. The destination writes them into a new
directory under its work directory, named as on the source (the next pass's
inventory names its parent by that relative name), and checks nothing but
the framing here: the set is a set only once load_images has verified its
manifest (every file listed, sizes and checksums, the chain's IDs), exactly
as for a local restore. Each frame is CRC-32C checked on the way.

Given `stream` (pycr.migrate.stream.PassStream's begin), the destination
hands it the set when the first process's pages file begins: from there each
pages file goes through the ArrivingPages it returns (into the replica as
it arrives, each chunk checked against the manifest first, and into the
file); None, or a set sent in another order, lands whole as before.

Names are refused unless they are one plain path component (no '/', no
leading '.'): a peer cannot write outside the set's directory.
"""

import os
import re
import time

from ..errors import PycrError
from ..formats import wire
from ..formats.wire import FrameType
from ..images import classify_name, is_process_pages
from ..log import log
from . import channel as ch

_SET_NAME = re.compile(r"^[0-9]{2,4}-(pre-dump|dump)$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,200}$")
#: A set of more files than this is not a pycr image set.
MAX_FILES = 100000


def set_files(path):
    """(name, size) of every file of a set directory, in sending order: the small images
    in name order, then the pages files of shared objects, then those of the processes."""
    out = []
    for name in sorted(os.listdir(path), key=_sending_order):
        full = os.path.join(path, name)
        if name.startswith(".") or not os.path.isfile(full):
            continue
        out.append((name, os.path.getsize(full)))
    return out


def _sending_order(name):
    kind = classify_name(name)
    if kind is None or kind.kind != "pages":
        return (0, name)
    return (2 if is_process_pages(name) else 1, name)


def send_set(channel, path, number, final, on_bytes=None):
    """Send the set at path -> bytes of file data sent (holes are sent as their length, SET_HOLE)."""
    return SetSender(channel, path, number, final).finish(on_bytes)


class SetSender:
    """One set on the channel: files sent early, while the set is still being written
    (early()), then the rest in the usual order (finish()).

    A migration's final pass sends its processes' pages files this way as soon as each is
    whole, so that they cross the link while the source still waits for the VMAs' flags;
    the manifest and the other small images follow. The destination then lets the set land
    whole before it checks and applies it (pycr.migrate.stream: pages before the manifest are
    not streamed), as for a set sent in any order. Should the pass fail after an early file,
    the set never ends: the destination discards it with the connection, as after a link cut.
    """

    def __init__(self, channel, path, number, final):
        self.channel, self.path, self.number, self.final = channel, path, number, final
        self.name = os.path.basename(path.rstrip("/"))
        self.sent = {}          # file name -> size
        self.total = 0          # bytes of file data sent
        self.seconds = 0.0      # spent sending, early files included: the link's time for this set
        self.early_seconds = 0.0    # of which while the set was still being taken
        self._begun = False

    def early(self, fname):
        """Send file fname of the set now (it is whole and will not change)."""
        started = time.monotonic()
        self._begin()
        self._file(fname, os.path.getsize(os.path.join(self.path, fname)))
        self.seconds += time.monotonic() - started
        self.early_seconds += time.monotonic() - started

    def finish(self, on_bytes=None):
        """Send every file not sent yet, then SET_END -> bytes of file data sent."""
        started = time.monotonic()
        self._begin()
        for fname, size in set_files(self.path):
            if fname not in self.sent:
                self._file(fname, size, on_bytes)
        self.channel.send(FrameType.SET_END, {"files": len(self.sent), "bytes": sum(self.sent.values())})
        self.seconds += time.monotonic() - started
        return self.total

    def _begin(self):
        if not self._begun:
            self.channel.send(FrameType.SET_BEGIN, {"number": self.number, "name": self.name,
                                                    "final": int(self.final)})
            self._begun = True

    def _file(self, fname, size, on_bytes=None):
        channel, name = self.channel, self.name
        channel.send(FrameType.SET_FILE, {"name": fname, "size": size})
        self.sent[fname] = size
        sent = 0
        with open(os.path.join(self.path, fname), "rb", buffering=0) as f:
            while sent < size:
                data_end = _data_end(f, sent, size)
                if data_end == sent:            # a hole (a lazy set's pages left in the tree)
                    hole = _hole_end(f, sent, size) - sent
                    channel.send(FrameType.SET_HOLE, {"size": hole})
                    sent += hole
                    continue
                f.seek(sent)
                chunk = f.read(min(wire.DATA_CHUNK, size - sent, data_end - sent))
                if not chunk:
                    raise PycrError(f"{self.path}/{fname}: shrank while it was sent")
                channel.send_data(chunk, f"{name}/{fname}")
                sent += len(chunk)
                self.total += len(chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk))


def _data_end(f, pos, size):
    """End of the data at pos (pos itself if a hole starts there)."""
    try:
        data = os.lseek(f.fileno(), pos, os.SEEK_DATA)
    except OSError:                     # ENXIO: only a hole up to the end
        return pos
    if data > pos:
        return pos
    try:
        return min(os.lseek(f.fileno(), pos, os.SEEK_HOLE), size)
    except OSError:
        return size


def _hole_end(f, pos, size):
    try:
        return min(os.lseek(f.fileno(), pos, os.SEEK_DATA), size)
    except OSError:
        return size


def receive_set(channel, top, begin, stream=None):
    """Receive the set announced by the SET_BEGIN frame `begin` into top/<name> -> its path.

    stream(path) -> an ArrivingPages or None, called once, when the first pages file of a
    process begins (pycr.migrate.stream). The directory must not exist yet. On any failure
    it is removed again."""
    name = begin.body.name
    if not _SET_NAME.match(name):
        raise ch.ProtocolError(f"{channel.name}: {ch.printable(name)!r} is not the name of a pass's image set")
    path = os.path.join(top, name)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        raise ch.ProtocolError(f"{channel.name}: sent the image set {name} twice") from None
    except OSError as exc:
        raise PycrError(f"{path}: cannot make the image set's directory: {exc.strerror}") from None
    try:
        _receive_files(channel, path, stream)
    except BaseException:
        remove_set(path)
        raise
    log.info("%s: image set %s received into %s", channel.name, name, path)
    return path


def _receive_files(channel, path, stream):
    seen = set()
    total = 0
    arriving = None
    while True:
        frame = channel.recv(FrameType.SET_FILE, FrameType.SET_END, idle=True)
        if frame.type == FrameType.SET_END:
            if frame.body.files != len(seen) or frame.body.bytes != total:
                raise ch.ProtocolError(f"{channel.name}: SET_END counts {frame.body.files} files, "
                                       f"{frame.body.bytes} bytes; {len(seen)} files, {total} bytes arrived")
            if arriving is not None:
                arriving.close()
            return
        fname, size = frame.body.name, frame.body.size
        if not _FILE_NAME.match(fname) or fname in seen:
            raise ch.ProtocolError(f"{channel.name}: {ch.printable(fname)!r} is not a file name of an image "
                                   "set, or came twice")
        if len(seen) >= MAX_FILES:
            raise ch.ProtocolError(f"{channel.name}: more than {MAX_FILES} files in one image set")
        seen.add(fname)
        if stream is not None and is_process_pages(fname):
            arriving, stream = stream(path), None      # asked once: the rest of the set is here
        if arriving is not None:
            _stream_file(channel, arriving.file(fname, size), size)
        else:
            _receive_file(channel, os.path.join(path, fname), size)
        total += size


def _receive_file(channel, target, size):
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        got = 0
        while got < size:
            frame = channel.recv(FrameType.DATA, FrameType.SET_HOLE)
            if frame.type == FrameType.SET_HOLE:
                if got + frame.body.size > size:
                    raise ch.ProtocolError(f"{channel.name}: a hole past the {size} bytes of "
                                           f"{os.path.basename(target)}")
                got += frame.body.size
                os.lseek(fd, got, os.SEEK_SET)
                os.ftruncate(fd, max(os.fstat(fd).st_size, got))
                continue
            data = memoryview(frame.body)
            if got + len(data) > size:
                raise ch.ProtocolError(f"{channel.name}: sent more than the {size} bytes of "
                                       f"{os.path.basename(target)}")
            while data:
                data = data[os.write(fd, data):]
            got += len(frame.body)
    except OSError as exc:
        raise PycrError(f"{target}: cannot write it: {exc.strerror}") from None
    finally:
        os.close(fd)


def _stream_file(channel, target, size):
    """The bytes of one pages file into target (an ArrivingFile), as they come."""
    try:
        got = 0
        while got < size:
            frame = channel.recv(FrameType.DATA, FrameType.SET_HOLE)
            n = frame.body.size if frame.type == FrameType.SET_HOLE else len(frame.body)
            if got + n > size:
                raise ch.ProtocolError(f"{channel.name}: sent more than the {size} bytes of "
                                       f"{os.path.basename(target.where)}")
            if frame.type == FrameType.SET_HOLE:
                target.zeros(n)
            else:
                target.write(frame.body)
            got += n
        target.close()
    finally:
        target.abort()


def remove_set(path):
    """Remove a received set directory (its files are all plain files)."""
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return
    for name in names:
        try:
            os.unlink(os.path.join(path, name))
        except OSError:
            pass
    try:
        os.rmdir(path)
    except OSError:
        pass
