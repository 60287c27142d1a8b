"""TLS on pycr's channel (`--tls`): mutual certificates, TLS 1.3 at least, around the whole stream.

Each side presents its certificate (`--tls-cert`, `--tls-key`) and checks
the peer's against one CA file (`--tls-cacert`, never the system's CAs: a
public CA's certificate must not open a page server), optionally against
that CA's revocation list (`--tls-cacrl`). The side that connects also checks
that the listener's certificate names the host it dialled (unless
`--tls-no-cn-verify`); the listener cannot know what name to expect of its
client. Every pycr is a client in one connection and a listener in another
(serve's lazy-pages daemon dials the migration's source), so one TlsConfig
makes both contexts. The handshake runs first on the connection, before the
hellos; the secret's challenge-response then runs inside it (pycr/net/auth.py).

The files are read and checked when the command starts (a missing or
unreadable file, a key that does not match its certificate, an encrypted key,
an expired certificate), before anything is frozen, in one line naming the
file and the option. A peer on the other side of the mistake (TLS on one side
only) is told in one line too: the listener looks at the first bytes a client
sends (a pycr hello in clear is not a TLS ClientHello), the client at what the
listener answers (not a TLS record).
"""

import os
import select
import socket
import ssl
import stat
import time

from ..errors import PycrError
from ..formats import wire
from . import CRIU_TLS_CACERT, CRIU_TLS_CACRL, CRIU_TLS_CERT, CRIU_TLS_KEY


class TlsError(Exception):
    """A failed TLS handshake, in words (channel.py names the peer and picks the NetError).

    kind: "refused" (a certificate or the TLS parameters were refused, either way), "plain"
    (the peer speaks pycr in clear), "timeout", "closed" (the peer closed during the handshake)."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


class TlsConfig:
    """This side's certificate and key, the CA that signs its peers' (and the CA's CRL)."""

    def __init__(self, cert, key, cacert, cacrl=None, verify_name=True):
        self.cert, self.key, self.cacert, self.cacrl = cert, key, cacert, cacrl
        self.verify_name = verify_name
        for path, what, option in ((cert, "TLS certificate", "--tls-cert"), (key, "TLS key", "--tls-key"),
                                   (cacert, "TLS CA certificate", "--tls-cacert"),
                                   (cacrl, "certificate revocation list", "--tls-cacrl")):
            if path is not None:
                _readable(path, what, option)
        _check_key_mode(key)
        _check_dates(cert)
        self._contexts = {side: self._context(side) for side in (False, True)}

    def context(self, server_side):
        return self._contexts[server_side]

    def _context(self, server_side):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED             # a listener asks for the client's certificate too
        ctx.check_hostname = not server_side and self.verify_name
        if server_side:
            # No session tickets: pycr never resumes a session, and a ticket is a TLS record that would
            # make the socket readable with no frame behind it (channel.py selects on it).
            ctx.num_tickets = 0
        try:
            ctx.load_cert_chain(self.cert, self.key, password=_no_passphrase)
        except _Encrypted:
            raise PycrError(f"{self.key}: the TLS key is encrypted with a passphrase (--tls-key): pycr takes "
                            "an unencrypted key (`openssl pkey -in KEY -out KEY2`), kept mode 0600") from None
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise PycrError(f"{self.key}: the TLS key does not match the certificate {self.cert} "
                                "(--tls-key, --tls-cert)") from None
            raise PycrError(f"{self.cert}, {self.key}: not a PEM certificate and its private key "
                            f"(--tls-cert, --tls-key): {_text(exc)}") from None
        try:
            ctx.load_verify_locations(cafile=self.cacert)
        except ssl.SSLError as exc:
            raise PycrError(f"{self.cacert}: not a PEM CA certificate (--tls-cacert): {_text(exc)}") from None
        if self.cacrl is not None:
            try:
                ctx.load_verify_locations(cafile=self.cacrl)
            except ssl.SSLError as exc:
                raise PycrError(f"{self.cacrl}: not a PEM certificate revocation list (--tls-cacrl): "
                                f"{_text(exc)}") from None
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        return ctx


def load(cert=None, key=None, cacert=None, cacrl=None, no_cn_verify=False):
    """A TlsConfig from the options, criu's paths for those not given (criu's revocation list only
    with criu's CA: another CA's certificates would all look unrevocable against it)."""
    if cacrl is None and cacert is None and os.access(CRIU_TLS_CACRL, os.R_OK):
        cacrl = CRIU_TLS_CACRL
    return TlsConfig(cert or CRIU_TLS_CERT, key or CRIU_TLS_KEY, cacert or CRIU_TLS_CACERT, cacrl,
                     verify_name=not no_cn_verify)


class _Encrypted(Exception):
    pass


def _no_passphrase():
    raise _Encrypted()          # never OpenSSL's prompt on the terminal


def _readable(path, what, option):
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        default = " (criu's default path: give " + option + ")" if path.startswith("/etc/pki/") else ""
        raise PycrError(f"{path}: cannot read the {what} ({option}): {exc.strerror}{default}") from None


def _check_key_mode(path):
    """As ssh and the secret file: a private key others may read or write is refused."""
    st = os.stat(path)
    if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
        raise PycrError(f"{path}: the TLS key is accessible by group or others (mode "
                        f"{stat.S_IMODE(st.st_mode):04o}, --tls-key): chmod 600 it")


def _check_dates(path):
    """This side's certificate is valid now, or one line says when it is (its peer would refuse it
    anyway, after the connection; this says it before anything starts)."""
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:          # no decoder in this Python: the peer's refusal says it instead
        return
    try:
        info = decode(path)
        not_before = ssl.cert_time_to_seconds(info["notBefore"])
        not_after = ssl.cert_time_to_seconds(info["notAfter"])
    except (ssl.SSLError, KeyError, ValueError):
        return                  # load_cert_chain names what is wrong with the file
    now = time.time()
    if now > not_after:
        raise PycrError(f"{path}: the TLS certificate expired on {info['notAfter']} (--tls-cert)")
    if now < not_before:
        raise PycrError(f"{path}: the TLS certificate is not valid before {info['notBefore']} (--tls-cert)")


# ------------------------------------------------------------------ the handshake

def handshake(sock, config, server_side, host, deadline):
    """Wrap the connected socket sock and run the TLS handshake by the monotonic deadline ->
    the SSLSocket, non-blocking (channel.py waits with select, one SSL call at a time).
    Raises TlsError. The listener first looks at the client's first bytes: a pycr hello in
    clear raises TlsError("plain") with the socket still plain (the caller may answer in clear).
    A client cannot look first (a plain listener's hello may be read by the first handshake
    call): a listener's answer that is no TLS record is taken for a pycr hello in clear."""
    if server_side:
        first = _peek(sock, deadline, "its TLS handshake")
        if first and wire.MAGIC.startswith(first[:len(wire.MAGIC)]):
            raise TlsError("plain", "connected without TLS (its pycr hello came in clear)")
    name = host if config.verify_name and not server_side else None
    ssock = config.context(server_side).wrap_socket(sock, server_side=server_side, server_hostname=name,
                                                    do_handshake_on_connect=False)
    ssock.setblocking(False)
    try:
        while True:
            try:
                ssock.do_handshake()
                return ssock
            except ssl.SSLWantReadError:
                readable = True
            except ssl.SSLWantWriteError:
                readable = False
            wait(ssock, readable, deadline, "the TLS handshake")
    except ssl.SSLError as exc:
        if server_side:
            _linger(ssock, deadline)
        ssock.close()
        if getattr(exc, "reason", None) == "WRONG_VERSION_NUMBER" and not server_side:
            # a pycr listener without --tls sends its hello in clear at once: not a TLS record
            raise TlsError("plain", "answered in clear, not with TLS: it runs without --tls; give both "
                                    "sides --tls, or neither") from None
        raise TlsError("closed" if isinstance(exc, ssl.SSLEOFError) else "refused", explain(exc)) from None
    except (TlsError, OSError):
        ssock.close()
        raise


def wait(sock, readable, deadline, what):
    """Until sock can be read (or written) -> None; TlsError("timeout") at the deadline."""
    left = deadline - time.monotonic()
    if left > 0:
        ready = select.select([sock], [], [], left) if readable else select.select([], [sock], [], left)
        if ready[0] or ready[1]:
            return
    raise TlsError("timeout", f"stopped answering during {what}")


def _linger(ssock, deadline, patience=1.0):
    """A listener that refused a client: its alert has left; read what the client still sends until
    it closes (for at most patience s), so that closing does not reset the connection and throw the
    alert away unread. In TLS 1.3 the client has finished its handshake by then and learns of its
    refused certificate only from that alert."""
    deadline = min(deadline, time.monotonic() + patience)
    try:
        socket.socket.shutdown(ssock, socket.SHUT_WR)
        while select.select([ssock], [], [], max(0.0, deadline - time.monotonic()))[0]:
            if not socket.socket.recv(ssock, 1 << 16):      # the raw bytes: the SSL object is done
                break
    except OSError:
        pass


def _peek(sock, deadline, what):
    """The first bytes waiting on sock, not consumed (b"" if it closed)."""
    wait(sock, True, deadline, what)
    try:
        return sock.recv(len(wire.MAGIC), socket.MSG_PEEK)
    except OSError:
        return b""


# ------------------------------------------------------------------ what went wrong, in words

# OpenSSL's X509_V_ERR_ codes for a chain that does not lead to the CA: UNABLE_TO_GET_ISSUER_CERT,
# DEPTH_ZERO_SELF_SIGNED_CERT, SELF_SIGNED_CERT_IN_CHAIN, UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
# UNABLE_TO_VERIFY_LEAF_SIGNATURE.
_OTHER_CA = {2, 18, 19, 20, 21}

# Alerts the peer sends when it refuses what this side presented.
_ALERTS = {
    "TLSV1_ALERT_UNKNOWN_CA": "refused this side's TLS certificate: not signed by the CA it trusts "
                              "(its --tls-cacert)",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "refused this side's TLS certificate: expired",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "refused this side's TLS certificate: revoked",
    "SSLV3_ALERT_BAD_CERTIFICATE": "refused this side's TLS certificate (a bad certificate, revoked, or not "
                                   "for this use)",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "refused this side's TLS certificate: not for this use (its "
                                           "extended key usage must allow both client and server)",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "wants a TLS certificate from this side, which sent none",
    "TLSV1_ALERT_PROTOCOL_VERSION": "refused the TLS version: pycr speaks TLS 1.3 at least",
    "TLSV1_ALERT_DECRYPT_ERROR": "refused the TLS handshake (decrypt error: a key that does not match its "
                                 "certificate?)",
}

_LOCAL = {
    "WRONG_VERSION_NUMBER": "does not speak TLS (is it running without --tls?)",
    "UNSUPPORTED_PROTOCOL": "offers no TLS 1.3: refused",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "sent no TLS certificate: refused (it needs --tls-cert and --tls-key)",
    "DECRYPTION_FAILED_OR_BAD_RECORD_MAC": "sent a TLS record that does not authenticate (changed on the way?)",
}


def explain(exc):
    """One line for an SSLError: what the peer refused, or what it did wrong."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message or _text(exc)
        hint = ""
        if exc.verify_code in _OTHER_CA:
            hint = " (not signed by the CA of --tls-cacert)"
        elif "mismatch" in why:
            hint = " (--tls-no-cn-verify skips the name check; the CA check stays)"
        return f"its TLS certificate is refused: {why}{hint}"
    if isinstance(exc, ssl.SSLEOFError):
        return "closed the connection during TLS"
    reason = getattr(exc, "reason", None) or ""
    if reason in _ALERTS:
        return _ALERTS[reason]
    if reason in _LOCAL:
        return _LOCAL[reason]
    if "ALERT" in reason:
        return f"ended TLS with an alert: {_text(exc)}"
    return f"TLS failed: {_text(exc)}"


def is_refusal(exc):
    """True if the SSLError is about certificates or TLS parameters (not the link breaking)."""
    reason = getattr(exc, "reason", None) or ""
    return isinstance(exc, ssl.SSLCertVerificationError) or reason in _ALERTS or reason in (
        "PEER_DID_NOT_RETURN_A_CERTIFICATE", "UNSUPPORTED_PROTOCOL")


def _text(exc):
    """OpenSSL's words without Python's '[SSL: REASON]' and '(_ssl.c:N)' wrapping."""
    text = str(exc.args[1]) if len(exc.args) > 1 and isinstance(exc.args[1], str) else str(exc)
    if text.startswith("["):
        text = text.split("] ", 1)[-1]
    return text.rsplit(" (_ssl.c:", 1)[0]
