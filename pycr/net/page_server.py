"""`pycr page-server`: receive the pages files of one dump or pre-dump into a directory.

As criu's page server: it serves one dump and exits. The peer must first
prove it holds the secret (auth.server_handshake); until then nothing it
sends is written, and a peer that fails to is refused without ending the
server (the dump may still come). Each file arrives as FILE_BEGIN, DATA..., FILE_END and
is written under a temporary name, fsynced, checked against the CRC-32C
sums the dump computed while reading the task (the sums its manifest will
hold), then renamed into place and acknowledged. The files are kept only
when the dump says DONE: if it aborts, disconnects, stops sending, or this
server fails (disk full), every file of the connection is removed again, so
the directory never holds half of a set.
"""

import contextlib
import os
import tempfile
from collections import namedtuple

from .. import checksum
from ..errors import PycrError
from ..formats.wire import FrameType, Role
from ..images import classify_name, fsync_dir
from ..log import log
from ..steps import step
from . import auth, channel as ch

Received = namedtuple("Received", "peer files bytes directory")


def check_directory(path):
    """Refuse a directory that holds pages files already, or one that cannot be made. A missing
    directory is made (0700) only when the first file arrives: a server that fails before (port
    in use, a refused peer, Ctrl-C) leaves nothing behind."""
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            raise PycrError(f"{path}: cannot write pages files there: cannot create it in {parent}") from None
        return
    except OSError as exc:
        raise PycrError(f"{path}: cannot write pages files there: {exc.strerror}") from None
    held = sorted(n for n in names if (classify_name(n) or (None,))[0] == "pages")
    if held:
        raise PycrError(f"{path}: holds pages files already ({held[0]}...): give each dump a new "
                        "directory, or remove them")


class Receiver:
    """The files one connection writes into the directory; discard() removes them all."""

    def __init__(self, directory):
        self.directory = directory
        self.kept = []
        self.bytes = 0
        self.current = None         # (name, fd, temp path)
        self.created = False        # the directory was made for this connection

    def begin(self, name):
        image = classify_name(name) if isinstance(name, str) and "\0" not in name else None
        if image is None or image.kind != "pages" or os.path.basename(name) != name:
            raise ch.ProtocolError(f"{name!r} is not the name of a pages file")
        if self.current is not None:
            raise ch.ProtocolError(f"{name} begins before {self.current[0]} ended")
        if name in self.kept or os.path.exists(os.path.join(self.directory, name)):
            raise PycrError(f"{self.directory}: holds {name} already")
        try:
            if not os.path.isdir(self.directory):
                os.makedirs(self.directory, mode=0o700)
                self.created = True
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{name}.", suffix=".tmp")
            os.fchmod(fd, 0o600)
        except OSError as exc:
            raise PycrError(f"{self.directory}: cannot write {name}: {exc.strerror}") from None
        self.current = (name, fd, tmp)

    def data(self, payload):
        name, fd, _ = self._now("DATA")
        view = memoryview(payload)
        try:
            while view:
                view = view[os.write(fd, view):]
        except OSError as exc:
            raise PycrError(f"{self.directory}: cannot write {name}: {exc.strerror}") from None

    def truncate(self, offset):
        name, fd, _ = self._now("TRUNCATE")
        if offset > os.lseek(fd, 0, os.SEEK_CUR):
            raise ch.ProtocolError(f"truncation of {name} to {offset} bytes, past its end")
        os.ftruncate(fd, offset)
        os.lseek(fd, offset, os.SEEK_SET)

    def end(self, size, chunk_size, sums):
        """Durable, checked against the dump's sums, renamed into place."""
        name, fd, tmp = self._now("FILE_END")
        try:
            os.fsync(fd)
        except OSError as exc:
            raise PycrError(f"{self.directory}: cannot write {name}: {exc.strerror}") from None
        have = os.fstat(fd).st_size
        if have != size:
            raise ch.ProtocolError(f"{name}: {have} bytes arrived, the dump says it sent {size}")
        if chunk_size != checksum.PAGES_CHUNK or len(sums) != 4 * -(-size // chunk_size):
            raise ch.ProtocolError(f"{name}: corrupt FILE_END: {len(sums) // 4} sums of {chunk_size}-byte "
                                   f"chunks for {size} bytes")
        if checksum.pages_sums(tmp, chunk_size).tobytes() != bytes(sums):
            raise PycrError(f"{os.path.join(self.directory, name)}: the bytes written differ from what the "
                            "dump read (CRC-32C mismatch): corrupted on the way or on this disk")
        os.close(fd)
        self.current = None
        os.rename(tmp, os.path.join(self.directory, name))
        fsync_dir(self.directory)
        self.kept.append(name)
        self.bytes += size
        log.info("%s: %d bytes, fsynced, CRC-32C sums match the dump's", name, size)

    def cancel(self):
        """Drop the file being written."""
        if self.current is not None:
            _, fd, tmp = self.current
            self.current = None
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def discard(self):
        """Remove every file of this connection (the dump failed or went away)."""
        self.cancel()
        for name in self.kept:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.directory, name))
        self.kept = []
        with contextlib.suppress(OSError):
            if self.created:
                os.rmdir(self.directory)
            else:
                fsync_dir(self.directory)

    def _now(self, what):
        if self.current is None:
            raise ch.ProtocolError(f"{what} frame outside a file")
        return self.current


def serve(listener, directory, creds):
    """Accept connections on listener until one authenticates (auth.Credentials: the secret, and
    the certificates under --tls); receive its files -> Received.

    A peer that fails before it has proved it holds the secret (a foreign
    client, a wrong secret or certificate, TLS on one side only, silence) is
    refused in one line on stderr and the server goes on waiting for the dump.
    Raises a PycrError (one line, naming the peer) for anything but a dump that
    ends with DONE; the directory then holds nothing of this connection.
    """
    try:
        channel = _authenticated(listener, creds)
    finally:
        listener.close()            # one dump, as criu's page server
    with channel:
        step("authenticated")
        receiver = Receiver(directory)
        try:
            _receive(channel, receiver)
        except BaseException as exc:
            receiver.discard()
            if not isinstance(exc, PycrError):
                raise
            text = str(exc)
            if not isinstance(exc, (ch.PeerLost, ch.PeerFailed)):
                channel.error(text.removeprefix(channel.name + ": "))     # the dump says why it failed
            if text.startswith(channel.name):
                raise
            raise type(exc)(f"{channel.name}: {text}") from None
        return Received(channel.name, len(receiver.kept), receiver.bytes, directory)


def _authenticated(listener, creds):
    """The first connection that passes TLS (if on), the hello and the handshake; the others are refused."""
    while True:
        channel = auth.accept(listener, creds)
        try:
            log.info("%s: connected", channel.name)
            channel.hello(Role.PAGE_SERVER, {Role.PAGE_CLIENT})
            auth.server_handshake(channel, creds.secret)
            return channel
        except ch.NetError as exc:
            channel.close()
            log.warning("page-server: refused %s; still waiting for the dump", exc)
        except BaseException:
            channel.close()
            raise


def _receive(channel, receiver):
    started = set()
    while True:
        frame = channel.recv(idle=True)
        kind = frame.type
        if kind == FrameType.FILE_BEGIN:
            receiver.begin(frame.body.name)
        elif kind == FrameType.DATA:
            receiver.data(frame.body)
            name = receiver.current[0]
            if name not in started:
                started.add(name)
                step(f"receive {name}")
        elif kind == FrameType.TRUNCATE:
            receiver.truncate(frame.body.offset)
        elif kind == FrameType.FILE_END:
            name = receiver.current[0] if receiver.current else None
            receiver.end(frame.body.size, frame.body.chunk_size, bytes(frame.body.sums))
            channel.send(FrameType.FILE_OK, {"name": name})
        elif kind == FrameType.FILE_CANCEL:
            receiver.cancel()
        elif kind == FrameType.DONE:
            if receiver.current is not None:
                raise ch.ProtocolError(f"{channel.name}: DONE while {receiver.current[0]} is unfinished")
            channel.send(FrameType.DONE_OK, {"files": len(receiver.kept), "bytes": receiver.bytes})
            return
        elif kind == FrameType.ABORT:
            n = len(receiver.kept)
            reason = ch.printable(frame.body.reason)
            why = f" ({reason})" if reason and reason != "the dump failed" else ""
            raise ch.PeerFailed(f"{channel.name}: the dump failed{why}; the {n} pages "
                                f"file{'s' if n != 1 else ''} received were removed")
        else:
            raise ch.ProtocolError(f"{channel.name}: sent a {kind.name} frame to a page server")
