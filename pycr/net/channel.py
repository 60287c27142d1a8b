"""Framed, checksummed messages over one TCP connection (the wire format of formats/wire.py).

Both sides send a hello (magic, protocol version, role) and check the
other's; then every message is a frame: header (type, flags, sequence
number, payload length), payload, CRC-32C of both. Whatever a peer sends
that is not this protocol (a foreign magic, another version, a truncated or
corrupt frame, an unknown type, a length over the limit, a frame out of
sequence) raises ProtocolError naming the peer, in one line. Every read has
a deadline: a peer that stops in the middle of a frame is dropped after the
frame timeout, one that sends nothing where a reply is due after the idle
timeout (settings.net_timeouts). A send has the same deadline (a peer that
takes no bytes while the socket buffer is full). Once a send has failed
the channel is broken: the stream may stop in the middle of a frame, so
nothing more is sent on it and every later send fails at once (a caller
holding a frozen tree must never wait twice for a dead peer).

With TLS (connect()/accept() given a tls.TlsConfig), hello() first runs the
TLS handshake, so that everything (the hellos, the authentication, every
frame) travels inside it. The TLS socket is non-blocking: every SSL call is
made under a lock and never waits, and the waiting is done with select
outside it, so that one thread may read while another sends (the lazy-pages
fetcher does), which OpenSSL does not allow on one SSL object at once. An SSL
socket has no sendmsg (a frame's parts are joined into one write: encryption
copies them anyway), and select does not see bytes OpenSSL has decrypted
already: ready() and readable() look at both. pycr/net has no sendfile or
MSG_ZEROCOPY path that TLS would have to give up.
"""

import contextlib
import errno
import os
import select
import socket
import ssl
import threading
import time

from construct.core import ConstructError

from .. import settings
from ..errors import PycrError
from ..formats import wire
from ..formats.wire import FrameType, Role
from ..log import log
from ..native.core import crc32c
from . import tls as tlsmod


class NetError(PycrError):
    """A network failure or refusal, said in one line that names the peer."""


class ProtocolError(NetError):
    """The peer sent something that is not pycr's protocol, or not at this point."""


class AuthError(NetError):
    """The peer could not prove it holds the secret (or we could not)."""


class PeerLost(NetError):
    """The connection closed, broke or timed out."""


class PeerClosed(PeerLost):
    """The peer closed or reset the connection."""


class PeerFailed(NetError):
    """The peer gave up and said why (an ERROR frame)."""


def describe(address):
    """'1.2.3.4:5' or '[::1]:5' of a socket address."""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Frame:
    """One received frame: its type, and its payload parsed (DATA: the bytes)."""

    __slots__ = ("type", "body")

    def __init__(self, ftype, body):
        self.type, self.body = ftype, body

    def __repr__(self):
        return f"Frame({self.type.name})"


class Channel:
    """One connection, after connect() or accept(): hello(), then send()/recv() frames.

    `name` says who the peer is in every error ("page server 1.2.3.4:5",
    "peer 1.2.3.4:5"). The socket is closed by close() or the with block.
    tls: (TlsConfig, server_side, host dialled): the TLS handshake hello() runs first.
    """

    def __init__(self, sock, name, timeouts=None, tls=None):
        self.sock = sock
        self.peer_address = None        # (host, port, ...) of an accepted connection
        self._tls = tls
        self.encrypted = False
        self._ssl_lock = threading.Lock()      # one SSL call at a time (module docstring)
        self.name = name
        self.frame_timeout, self.idle_timeout = timeouts or settings.net_timeouts()
        self.sent_hello = self.peer_hello = b""
        self.peer_role = None
        self._send_seq = 0
        self._recv_seq = 0
        self.broken = None          # the PeerLost of the first failed send or read
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.close()

    # ------------------------------------------------------------ hello

    def hello(self, role, accept):
        """(TLS first, if asked) Send our hello, read and check the peer's -> its Role (one of `accept`)."""
        self.sent_hello = wire.Hello.build(dict(magic=wire.MAGIC, version=wire.PROTOCOL_VERSION,
                                                role=int(role), reserved=bytes(3)))
        if self._tls is not None:
            self._start_tls()
        try:
            self._send_parts([self.sent_hello], "the hello")
            data = self._read_exact(wire.HELLO_SIZE, self.frame_timeout, "its hello", at_start=True)
        except PeerClosed as exc:
            if self.encrypted:      # in TLS 1.3 a client hears of its refused certificate only now
                raise AuthError(f"{exc}, right after the TLS handshake: did it refuse this side's "
                                "certificate (revoked, or another name)?") from None
            raise
        if data[:1] in (b"\x15", b"\x16") and data[1:2] == b"\x03":     # a TLS record: handshake, alert
            raise ProtocolError(f"{self.name}: speaks TLS (it runs with --tls), this side does not: give "
                                "both sides --tls, or neither")
        hello = wire.Hello.parse(data)
        if bytes(hello.magic) != wire.MAGIC:
            raise ProtocolError(f"{self.name}: not a pycr peer (its first bytes are {data[:8]!r})")
        if hello.version != wire.PROTOCOL_VERSION:
            raise ProtocolError(f"{self.name}: speaks protocol version {hello.version}, this pycr "
                                f"speaks {wire.PROTOCOL_VERSION}")
        try:
            peer_role = Role(hello.role)
        except ValueError:
            raise ProtocolError(f"{self.name}: unknown role {hello.role} in its hello") from None
        if bytes(hello.reserved) != bytes(3):
            raise ProtocolError(f"{self.name}: corrupt hello: reserved bytes {bytes(hello.reserved).hex()}")
        if peer_role not in accept:
            raise ProtocolError(f"{self.name}: is a {_role_name(peer_role)}, expected a "
                                + " or ".join(_role_name(r) for r in accept))
        self.peer_hello, self.peer_role = data, peer_role
        return peer_role

    def _start_tls(self):
        """The TLS handshake, before the hellos. A plain pycr client of a TLS listener is answered in
        clear (a hello and an ERROR) so that it too says in one line what is wrong."""
        config, server_side, host = self._tls
        self._tls = None
        deadline = time.monotonic() + self.frame_timeout
        sock = self.sock
        try:
            self.sock = tlsmod.handshake(sock, config, server_side, host, deadline)
        except tlsmod.TlsError as exc:
            if exc.kind == "plain" and server_side:
                with contextlib.suppress(NetError):
                    self._send_parts([self.sent_hello], "the hello", patience=2.0)
                self.error("takes only TLS connections (it runs with --tls): give this side --tls and its "
                           "certificates too, or run both without")
                raise ProtocolError(f"{self.name}: {exc}; this side runs with --tls: refused") from None
            self.broken = (AuthError if exc.kind == "refused" else
                           ProtocolError if exc.kind == "plain" else PeerLost)(f"{self.name}: {exc}")
            raise self.broken from None
        except OSError as exc:
            self.broken = PeerLost(f"{self.name}: {exc.strerror or exc} during the TLS handshake")
            raise self.broken from None
        self.encrypted = True
        cert = self.sock.getpeercert() or {}
        subject = ", ".join(f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)
        log.info("%s: %s, %s; its certificate (%s) checked against %s", self.name, self.sock.version(),
                 self.sock.cipher()[0], subject or "no subject", config.cacert)

    # ------------------------------------------------------------ the socket, plain or TLS

    def buffered(self):
        """True if bytes are waiting that select does not see (decrypted by TLS already)."""
        if not self.encrypted:
            return False
        with self._ssl_lock:
            return self.sock.pending() > 0

    def readable(self, timeout=0):
        """True if something (a frame, the end) can be read within timeout seconds (None: wait)."""
        return self.buffered() or bool(select.select([self.sock], [], [], timeout)[0])

    def _wait(self, readable, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout()
        ready = select.select([self.sock], [], [], left) if readable else select.select([], [self.sock], [], left)
        if not (ready[0] or ready[1]):
            raise socket.timeout()

    def _recv_some(self, view, deadline):
        """Some bytes into view by the monotonic deadline -> how many (0: the peer closed);
        socket.timeout if none came."""
        return self._io(lambda: self.sock.recv_into(view), deadline, at_end=0)

    def _send_some(self, views, deadline):
        """Some of views sent by the monotonic deadline -> bytes sent; socket.timeout if none could be."""
        if not self.encrypted:
            return self._io(lambda: self.sock.sendmsg(views), deadline)
        # after a want, OpenSSL takes the same bytes again (Python allows a moved buffer)
        return self._io(lambda: self.sock.send(views[0]), deadline)

    def _io(self, op, deadline, at_end=None):
        """op() (one recv or send) by the monotonic deadline. In clear, a socket timeout does
        the waiting; under TLS the socket is non-blocking and each SSL call is made under the
        lock (one SSL object, two threads), the waiting outside it. at_end: what a receive
        returns when the TLS stream ended (close_notify, or a close without it: framing tells
        a truncation); None for a send, where that is an error."""
        if not self.encrypted:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout()
            self.sock.settimeout(left)
            return op()
        while True:
            with self._ssl_lock:
                try:
                    return op()
                except ssl.SSLWantReadError:
                    readable = True
                except ssl.SSLWantWriteError:
                    readable = False
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    if at_end is None:
                        raise
                    return at_end
            self._wait(readable, deadline)

    def _shutdown_write(self):
        """No more bytes from us (the peer reads the end after what was sent). Under TLS the plain
        socket's shutdown: SSLSocket.shutdown would drop the SSL object, and the peer's last
        frames with it."""
        socket.socket.shutdown(self.sock, socket.SHUT_WR)

    # ------------------------------------------------------------ sending

    def send(self, ftype, body=None, what=None, patience=None):
        """Send one frame: body is a dict for the type's schema (DATA: bytes).
        patience: seconds the peer may take to accept it (default: the frame timeout)."""
        if self.broken is not None:
            raise type(self.broken)(str(self.broken))
        schema = wire.PAYLOADS[ftype]
        payload = body if schema is None else schema.build(body or {})
        if len(payload) > wire.MAX_PAYLOAD:
            raise ValueError(f"{ftype.name} payload of {len(payload)} bytes is over the limit")
        header = wire.FrameHeader.build(dict(type=int(ftype), flags=0, reserved=0, seq=self._send_seq,
                                             length=len(payload)))
        crc = crc32c(payload, crc32c(header))
        self._send_seq += 1
        self._send_parts([header, payload, wire.FrameTrailer.build(dict(crc=crc))],
                         what or f"a {ftype.name} frame", patience)

    def send_data(self, data, what="data"):
        """Send bytes as DATA frames of at most wire.DATA_CHUNK. A peer that answers
        while it should only take (its ERROR: disk full) is heard before each frame."""
        view = memoryview(data)
        for i in range(0, len(view), wire.DATA_CHUNK):
            self.check_incoming()
            self.send(FrameType.DATA, view[i:i + wire.DATA_CHUNK], what)

    def check_incoming(self):
        """Raise what the peer sent unasked (PeerFailed for its ERROR, PeerLost if it closed)."""
        if self.readable(0):
            frame = self._read_frame(self.frame_timeout)
            if frame.type == FrameType.ERROR:
                raise PeerFailed(f"{self.name}: {printable(frame.body.message)}")
            raise ProtocolError(f"{self.name}: sent a {frame.type.name} frame unasked")

    def error(self, message, linger=2.0):
        """Tell the peer why we give up, if it still listens (never raises). The ERROR frame
        gets at most `linger` s to leave (the peer may be the one that stalls); what the peer
        still sends is then read and dropped for up to `linger` s, so that closing does not
        reset the connection (which would throw away our ERROR before the peer reads it).
        Nothing is sent on a broken channel."""
        if self.broken is not None:
            return
        with contextlib.suppress(NetError, OSError, ValueError):
            self.send(FrameType.ERROR, {"message": str(message)[:4000]},
                      patience=min(linger, self.frame_timeout))
            self._shutdown_write()
            deadline = time.monotonic() + linger
            scratch = memoryview(bytearray(1 << 16))
            while self._recv_some(scratch, deadline):
                pass

    def _send_parts(self, parts, what, patience=None):
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        if self.encrypted and len(views) > 1:
            views = [memoryview(b"".join(views))]      # no sendmsg on an SSL socket
        patience = self.frame_timeout if patience is None else patience
        deadline = time.monotonic() + patience
        try:
            return self._send_until(views, deadline)
        except socket.timeout:
            self.broken = PeerLost(f"{self.name}: took no data for {patience:g} s while pycr sent "
                                   f"{what}: dropped")
        except OSError as exc:
            self.broken = self._lost(exc, f"while pycr sent {what}")
        raise self.broken

    def _send_until(self, views, deadline):
        """Send every view by the monotonic deadline (socket.timeout if not)."""
        while views:
            sent = self._send_some(views, deadline)
            while views and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if sent:
                views[0] = views[0][sent:]

    def _lost(self, exc, when):
        """The PeerLost (or the peer's own ERROR, if it sent one before closing) for a broken send."""
        failed = self.pending_error()
        if failed:
            return failed
        if isinstance(exc, ssl.SSLError):
            return _tls_failure(self.name, exc, when)
        reason = {errno.EPIPE: "closed the connection", errno.ECONNRESET: "reset the connection"}.get(exc.errno)
        if reason:
            return PeerClosed(f"{self.name}: {reason} {when}")
        return PeerLost(f"{self.name}: {exc.strerror or exc} {when}")

    def pending_error(self):
        """A PeerFailed if the peer left an ERROR frame before it closed, else None."""
        try:
            frame = self._read_frame(0.5)
        except (NetError, OSError):
            return None
        if frame.type == FrameType.ERROR:
            return PeerFailed(f"{self.name}: {printable(frame.body.message)}")
        return None

    # ------------------------------------------------------------ receiving

    def recv(self, *expect, idle=False):
        """The next frame, of one of the types `expect`; an ERROR frame raises PeerFailed.

        idle: the peer may take the idle timeout before it begins the frame (it is
        working: fsyncing a file, copying memory); otherwise the frame timeout.
        """
        frame = self._read_frame(self.idle_timeout if idle else self.frame_timeout)
        if frame.type == FrameType.ERROR:
            raise PeerFailed(f"{self.name}: {printable(frame.body.message)}")
        if expect and frame.type not in expect:
            raise ProtocolError(f"{self.name}: sent a {frame.type.name} frame where pycr expected "
                                + " or ".join(t.name for t in expect))
        return frame

    def _read_frame(self, patience):
        header_bytes = self._read_exact(wire.FRAME_HEADER_SIZE, patience, "a frame header", at_start=True)
        header = wire.FrameHeader.parse(header_bytes)
        seq = self._recv_seq
        if header.length > wire.MAX_PAYLOAD:
            raise ProtocolError(f"{self.name}: corrupt frame: payload of {header.length} bytes is over "
                                f"the limit of {wire.MAX_PAYLOAD}")
        deadline = time.monotonic() + self.frame_timeout
        payload = self._read_exact(header.length, deadline, "a frame payload")
        trailer = wire.FrameTrailer.parse(self._read_exact(wire.FRAME_TRAILER_SIZE, deadline,
                                                           "a frame checksum"))
        crc = crc32c(payload, crc32c(header_bytes))
        if crc != trailer.crc:
            raise ProtocolError(f"{self.name}: corrupt frame {seq}: checksum {trailer.crc:08x}, "
                                f"computed {crc:08x}")
        if header.seq != seq:
            raise ProtocolError(f"{self.name}: frame {header.seq} arrived where frame {seq} was due")
        self._recv_seq += 1
        try:
            ftype = FrameType(header.type)
        except ValueError:
            raise ProtocolError(f"{self.name}: unknown frame type {header.type}") from None
        if header.flags or header.reserved:
            raise ProtocolError(f"{self.name}: corrupt {ftype.name} frame: flags {header.flags:#x}, "
                                f"reserved {header.reserved:#x} (none are defined)")
        schema = wire.PAYLOADS[ftype]
        if schema is None:
            return Frame(ftype, payload)
        try:
            body = schema.parse(payload)
            if len(schema.build(body)) != len(payload):
                raise ConstructError("bytes after its end")
        except (ConstructError, UnicodeError) as exc:
            raise ProtocolError(f"{self.name}: corrupt {ftype.name} frame: "
                                f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}") from None
        return Frame(ftype, body)

    def _read_exact(self, n, deadline, what, at_start=False):
        """n bytes from the peer. at_start: deadline is the patience in seconds for the first byte
        (the rest of the item then gets the frame timeout); otherwise the monotonic deadline."""
        patience = None
        if at_start:
            patience, deadline = deadline, time.monotonic() + deadline
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                if got == 0 and patience is not None:
                    raise PeerLost(f"{self.name}: sent nothing for {patience:g} s where {what} was "
                                   "due: dropped")
                raise PeerLost(f"{self.name}: stopped sending in the middle of {what} ({got} of {n} "
                               f"bytes): dropped after {self.frame_timeout:g} s")
            try:
                k = self._recv_some(view[got:], deadline)
            except socket.timeout:
                continue
            except ssl.SSLError as exc:
                raise _tls_failure(self.name, exc, f"while pycr read {what}") from None
            except OSError as exc:
                if exc.errno == errno.ECONNRESET:
                    raise PeerClosed(f"{self.name}: reset the connection while pycr read {what}") from None
                raise PeerLost(f"{self.name}: {exc.strerror or exc} while pycr read {what}") from None
            if k == 0:
                if got == 0 and at_start:
                    raise PeerClosed(f"{self.name}: closed the connection")
                raise ProtocolError(f"{self.name}: truncated frame: the connection closed after {got} "
                                    f"of the {n} bytes of {what}")
            if got == 0 and patience is not None:
                deadline = time.monotonic() + self.frame_timeout    # the item has begun
            got += k
        return bytes(buf)


def printable(text, limit=300):
    """A peer's words made safe for one terminal line: no control characters, bounded."""
    text = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return text + ("..." if len(text) >= limit else "")


def _tls_failure(name, exc, when):
    """The NetError of an SSLError on an established channel: AuthError if the peer refused this
    side's certificate (a TLS 1.3 client learns it at its first read), else PeerLost."""
    if tlsmod.is_refusal(exc):
        return AuthError(f"{name}: {tlsmod.explain(exc)}")
    return PeerLost(f"{name}: {tlsmod.explain(exc)} {when}")


def _role_name(role):
    return role.name.lower().replace("_", "-")


def ready(watched, timeout=None):
    """Which of watched (Channels, sockets, fds) can be read within timeout seconds (None: wait),
    as select.select's first list; a Channel holding decrypted bytes counts at once."""
    now = [w for w in watched if isinstance(w, Channel) and w.buffered()]
    fds = [w.sock if isinstance(w, Channel) else w for w in watched]
    got = select.select(fds, [], [], 0 if now else timeout)[0]
    return now + [w for w, fd in zip(watched, fds) if fd in got and w not in now]


def connect(host, port, label="peer", tls=None):
    """A Channel to host:port (not yet through its hello, which runs the TLS handshake if tls,
    a tls.TlsConfig, is given). NetError if it cannot be reached."""
    where = f"{label} {host}:{port}"
    frame_timeout, idle = settings.net_timeouts()
    try:
        sock = socket.create_connection((host, port), timeout=frame_timeout)
    except socket.gaierror as exc:
        raise NetError(f"{where}: cannot resolve the address: {exc.strerror}") from None
    except socket.timeout:
        raise PeerLost(f"{where}: no answer to the connection within {frame_timeout:g} s") from None
    except OSError as exc:
        raise NetError(f"{where}: cannot connect: {exc.strerror or exc}") from None
    log.info("connected to %s from %s", where, describe(sock.getsockname()))
    return Channel(sock, f"{label} {describe(sock.getpeername())}", (frame_timeout, idle),
                   tls=None if tls is None else (tls, False, host))


def listen(address, port):
    """A listening TCP socket on address:port (port 0: the kernel picks one); NetError if it cannot."""
    family = socket.AF_INET6 if ":" in (address or "") else socket.AF_INET
    try:
        return socket.create_server((address or "", port), family=family, backlog=1)
    except socket.gaierror as exc:
        raise NetError(f"{address}: cannot resolve the address: {exc.strerror}") from None
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)   # not create_server's own words
        raise NetError(f"cannot listen on {address or '*'}:{port}: {reason}") from None


def accept(server_sock, tls=None):
    """The next connection on a listening socket, as a Channel named after its peer (its hello
    runs the TLS handshake first if tls, a tls.TlsConfig, is given)."""
    sock, addr = server_sock.accept()
    chan = Channel(sock, f"peer {describe(addr)}", tls=None if tls is None else (tls, True, None))
    chan.peer_address = addr
    return chan
