"""Mutual authentication of two pycr peers that hold the same secret file.

Right after the hellos: the server sends a fresh random nonce; the client
answers with its own nonce and HMAC-SHA256(secret, "client" + both hellos +
both nonces); the server checks it (hmac.compare_digest) and only then
answers with the same HMAC labelled "server". The secret never crosses the
wire, and a proof is worth nothing in another connection: it covers the
other side's fresh nonce, both roles and the protocol version (in the
hellos), and a label that tells the two directions apart (no reflection).
Nothing else is read from a peer before its proof checked out.
This authenticates the peers; it does not hide or seal what follows
(docs/trust.md, "Network"). With --tls the whole connection runs inside TLS
(pycr/net/tls.py: the certificates are checked first) and this challenge
still runs inside it: a peer must pass both.
"""

import hashlib
import hmac
import os
import stat
from dataclasses import dataclass

from ..errors import PycrError
from ..formats import wire
from ..formats.wire import FrameType
from ..log import log
from . import channel as ch
from .channel import AuthError, PeerFailed

#: A secret file larger than this is not a secret but a mistake (a wrong path).
SECRET_MAX = 64 << 10
LABEL = b"pycr-auth"


@dataclass(frozen=True)
class Credentials:
    """What this side proves itself with and checks its peers by: the secret file's bytes, and
    the TLS certificates (a tls.TlsConfig) or None for a connection in clear."""
    secret: bytes
    tls: object = None


def credentials(secret_file, tls=None):
    """Credentials of the secret file (refused as read_secret says) and a tls.TlsConfig or None."""
    return Credentials(read_secret(secret_file), tls)


def read_secret(path):
    """The secret bytes of the file at path (trailing newlines dropped).

    Refused in one line, as ssh refuses a private key: not a regular file,
    readable or writable by group or others, owned by another user (root
    aside), empty, or larger than SECRET_MAX.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise PycrError(f"{path}: cannot read the secret file: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PycrError(f"{path}: the secret file is not a regular file")
        if st.st_mode & 0o077:
            raise PycrError(f"{path}: the secret file is accessible by group or others (mode "
                            f"{stat.S_IMODE(st.st_mode):04o}): chmod 600 it")
        if st.st_uid not in (os.geteuid(), 0):
            raise PycrError(f"{path}: the secret file belongs to uid {st.st_uid}, not to this user")
        if st.st_size > SECRET_MAX:
            raise PycrError(f"{path}: {st.st_size} bytes is too large for a secret file "
                            f"(at most {SECRET_MAX})")
        data = os.read(fd, SECRET_MAX + 1)
    finally:
        os.close(fd)
    secret = data.rstrip(b"\r\n")
    if not secret:
        raise PycrError(f"{path}: the secret file is empty")
    return secret


def _proof(secret, who, client_hello, server_hello, server_nonce, client_nonce):
    message = b"\0".join((LABEL, who, client_hello, server_hello, server_nonce, client_nonce))
    return hmac.new(secret, message, hashlib.sha256).digest()


def client_handshake(channel, secret):
    """Prove to the server we hold the secret, then check it does. AuthError if either fails."""
    challenge = channel.recv(FrameType.CHALLENGE)
    server_nonce = bytes(challenge.body.nonce)
    client_nonce = os.urandom(wire.NONCE_SIZE)
    hellos = (channel.sent_hello, channel.peer_hello)
    channel.send(FrameType.AUTH, {"nonce": client_nonce,
                                  "proof": _proof(secret, b"client", *hellos, server_nonce, client_nonce)})
    try:
        answer = channel.recv(FrameType.PROOF)
    except PeerFailed as exc:
        raise AuthError(f"{exc} (pycr's proof was refused: are the secret files the same?)") from None
    want = _proof(secret, b"server", *hellos, server_nonce, client_nonce)
    if not hmac.compare_digest(bytes(answer.body.proof), want):
        raise AuthError(f"{channel.name}: failed to prove it holds the secret (the secret files differ, "
                        "or it is not the peer you meant)")
    log.info("%s: authenticated (HMAC-SHA256 challenge-response both ways)", channel.name)


def connect(host, port, what, role, peer_roles, creds):
    """Connect to a pycr peer (`what` names it in messages), run TLS if creds ask for it, exchange
    hellos and authenticate -> the channel; on any failure it is closed again."""
    channel = ch.connect(host, port, what, tls=creds.tls)
    try:
        channel.hello(role, peer_roles)
        client_handshake(channel, creds.secret)
    except BaseException:
        channel.close()
        raise
    return channel


def accept(listener, creds):
    """The next connection on listener, as a Channel whose hello() runs TLS first if creds ask."""
    return ch.accept(listener, tls=creds.tls)


def server_handshake(channel, secret):
    """Check the client's proof before anything else is read from it, then prove ourselves."""
    server_nonce = os.urandom(wire.NONCE_SIZE)
    channel.send(FrameType.CHALLENGE, {"nonce": server_nonce})
    auth = channel.recv(FrameType.AUTH)
    client_nonce = bytes(auth.body.nonce)
    hellos = (channel.peer_hello, channel.sent_hello)
    want = _proof(secret, b"client", *hellos, server_nonce, client_nonce)
    if not hmac.compare_digest(bytes(auth.body.proof), want):
        channel.error("authentication failed")
        raise AuthError(f"{channel.name}: failed authentication: its proof does not match this secret "
                        "(the secret files differ)")
    channel.send(FrameType.PROOF, {"proof": _proof(secret, b"server", *hellos, server_nonce, client_nonce)})
    log.info("%s: authenticated (HMAC-SHA256 challenge-response both ways)", channel.name)
