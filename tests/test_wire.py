"""The network channel over real sockets: frames round-trip, anything else is refused in one line,
and the HMAC handshake lets through only a peer holding the same secret (never a replayed proof)."""

import os
import socket
import threading
import time

import pytest

from pycr.errors import PycrError
from pycr.formats import wire
from pycr.formats.wire import FrameType, Role
from pycr.native.core import crc32c
from pycr.net import auth
from pycr.net.channel import AuthError, Channel, PeerFailed, PeerLost, ProtocolError

SAMPLES = {
    FrameType.CHALLENGE: {"nonce": bytes(range(32))},
    FrameType.AUTH: {"nonce": b"n" * 32, "proof": b"p" * 32},
    FrameType.PROOF: {"proof": b"q" * 32},
    FrameType.FILE_BEGIN: {"name": "pages-4242.img"},
    FrameType.DATA: os.urandom(3 * wire.DATA_CHUNK // 2),
    FrameType.TRUNCATE: {"offset": 1 << 33},
    FrameType.FILE_END: {"size": 5 << 20, "chunk_size": 1 << 20, "sums": bytes(20)},
    FrameType.FILE_OK: {"name": "pages-shmem-7.img"},
    FrameType.DONE: {},
    FrameType.DONE_OK: {"files": 3, "bytes": 123456789},
    FrameType.ABORT: {"reason": "pid 12: no such process"},
    FrameType.FILE_CANCEL: {"name": "pages-1.img"},
    FrameType.REPLICA_GONE: {},
    FrameType.SOURCE_THAWED: {},
}


def pair(frame_timeout=2.0, idle_timeout=2.0):
    a, b = socket.socketpair()
    return (Channel(a, "peer A", (frame_timeout, idle_timeout)),
            Channel(b, "peer B", (frame_timeout, idle_timeout)))


def hello_bytes(magic=wire.MAGIC, version=wire.PROTOCOL_VERSION, role=Role.PAGE_CLIENT):
    return wire.Hello.build(dict(magic=magic, version=version, role=int(role), reserved=bytes(3)))


def frame_bytes(ftype, payload, seq=0, flags=0, crc=None, length=None):
    header = wire.FrameHeader.build(dict(type=int(ftype), flags=flags, reserved=0, seq=seq,
                                         length=len(payload) if length is None else length))
    crc = crc32c(payload, crc32c(header)) if crc is None else crc
    return header + payload + wire.FrameTrailer.build(dict(crc=crc))


def helloed():
    """Two channels past their hellos (a client and a page server)."""
    a, b = pair()
    t = threading.Thread(target=b.hello, args=(Role.PAGE_SERVER, {Role.PAGE_CLIENT}))
    t.start()
    a.hello(Role.PAGE_CLIENT, {Role.PAGE_SERVER})
    t.join()
    return a, b


@pytest.mark.parametrize("ftype", list(SAMPLES), ids=lambda t: t.name)
def test_every_frame_type_round_trips(ftype):
    a, b = pair()
    with a, b:
        sent = SAMPLES[ftype]
        if ftype == FrameType.DATA:
            t = threading.Thread(target=a.send_data, args=(sent,))     # more than a socket buffer holds
            t.start()
            first, second = b.recv(FrameType.DATA).body, b.recv(FrameType.DATA).body
            t.join()
            assert len(first) == wire.DATA_CHUNK and first + second == sent
        else:
            a.send(ftype, sent)
            frame = b.recv(ftype)
            for key, value in sent.items():
                assert frame.body[key] == value


def test_an_error_frame_raises_the_peers_words_made_printable():
    a, b = pair()
    with a, b:
        a.error("disk full\x1b[2J on /srv")
        with pytest.raises(PeerFailed, match=r"^peer B: disk full\?\[2J on /srv$"):
            b.recv(FrameType.FILE_OK)


def test_a_frame_of_another_type_than_expected_is_refused():
    a, b = pair()
    with a, b:
        a.send(FrameType.DONE, {})
        with pytest.raises(ProtocolError, match="sent a DONE frame where pycr expected FILE_OK"):
            b.recv(FrameType.FILE_OK)


@pytest.mark.parametrize("raw, why", [
    (b"GET / HTTP/1.0\r\n\r\n", r"not a pycr peer \(its first bytes are b'GET / HT'\)"),
    (hello_bytes(version=wire.PROTOCOL_VERSION + 1), rf"speaks protocol version {wire.PROTOCOL_VERSION + 1}, this pycr speaks {wire.PROTOCOL_VERSION}"),
    (hello_bytes(role=Role.PAGE_SERVER), r"is a page-server, expected a page-client"),
    (hello_bytes()[:9] + b"\1\0\0", r"corrupt hello"),
    (hello_bytes()[:5], r"truncated frame: the connection closed after 5 of the 12 bytes of its hello"),
], ids=["foreign", "version", "role", "reserved", "truncated"])
def test_a_bad_hello_is_refused_in_one_line(raw, why):
    a, b = pair()
    with b:
        a.sock.sendall(raw)
        a.sock.shutdown(socket.SHUT_WR)
        with pytest.raises(ProtocolError, match=why) as err:
            b.hello(Role.PAGE_SERVER, {Role.PAGE_CLIENT})
        assert "\n" not in str(err.value)
        a.close()


def _bad_frames():
    good = frame_bytes(FrameType.FILE_BEGIN, wire.FileBegin.build({"name": "pages-1.img"}))
    flipped = bytearray(good)
    flipped[15] ^= 0x40
    return [
        (bytes(flipped), r"corrupt frame 0: checksum [0-9a-f]{8}, computed [0-9a-f]{8}"),
        (frame_bytes(FrameType.DONE, b"", length=wire.MAX_PAYLOAD + 1), r"corrupt frame: payload of 4194305 bytes is over the limit of 4194304"),
        (frame_bytes(99, b""), r"unknown frame type 99"),
        (frame_bytes(FrameType.DONE, b"", seq=7), r"frame 7 arrived where frame 0 was due"),
        (frame_bytes(FrameType.DONE, b"", flags=1), r"corrupt DONE frame: flags 0x1"),
        (frame_bytes(FrameType.FILE_BEGIN, b"\xff\xff\xff\x7f"), r"corrupt FILE_BEGIN frame"),
        (frame_bytes(FrameType.DONE, b"xx"), r"corrupt DONE frame"),
        (good[:20], r"truncated frame: the connection closed after 8 of the 15 bytes of a frame payload"),
    ]


@pytest.mark.parametrize("raw, why", _bad_frames(),
                         ids=["checksum", "oversized", "unknown", "sequence", "flags", "payload", "trailing",
                              "truncated"])
def test_a_bad_frame_is_refused_in_one_line(raw, why):
    a, b = pair()
    with b:
        a.sock.sendall(raw)
        a.sock.shutdown(socket.SHUT_WR)
        with pytest.raises(ProtocolError, match="^peer B: " + why):
            b.recv()
        a.close()


def test_a_peer_silent_mid_frame_is_dropped_after_the_frame_timeout():
    a, b = pair(frame_timeout=0.5, idle_timeout=0.5)
    with a, b:
        a.sock.sendall(frame_bytes(FrameType.DONE, b"")[:5])     # then nothing
        began = time.monotonic()
        with pytest.raises(PeerLost, match=r"stopped sending in the middle of a frame header \(5 of 12 bytes\): "
                                           r"dropped after 0.5 s"):
            b.recv()
        assert time.monotonic() - began < 3


def test_a_peer_silent_where_a_frame_is_due_is_dropped_after_the_idle_timeout():
    a, b = pair(frame_timeout=0.3, idle_timeout=0.8)
    with a, b:
        began = time.monotonic()
        with pytest.raises(PeerLost, match=r"sent nothing for 0.8 s where a frame header was due"):
            b.recv(idle=True)
        assert 0.7 < time.monotonic() - began < 3


def test_a_closed_connection_is_named():
    a, b = pair()
    with b:
        a.close()
        with pytest.raises(PeerLost, match="^peer B: closed the connection$"):
            b.recv()


# ---------------------------------------------------------------- authentication

def handshake(client_secret, server_secret):
    """Run both sides; -> (client outcome, server outcome): None or the exception."""
    a, b = helloed()
    out = {}

    def server():
        try:
            auth.server_handshake(b, server_secret)
            out["server"] = None
        except PycrError as exc:
            out["server"] = exc

    t = threading.Thread(target=server)
    t.start()
    try:
        auth.client_handshake(a, client_secret)
        out["client"] = None
    except PycrError as exc:
        out["client"] = exc
    t.join(10)
    a.close()
    b.close()
    return out["client"], out["server"]


def test_the_same_secret_authenticates_both_ways():
    assert handshake(b"correct horse", b"correct horse") == (None, None)


def test_a_different_secret_is_refused_on_both_sides():
    client, server = handshake(b"correct horse", b"battery staple")
    assert isinstance(server, AuthError) and "its proof does not match this secret" in str(server)
    assert isinstance(client, AuthError) and "pycr's proof was refused" in str(client)


def test_a_recorded_proof_does_not_authenticate_another_connection():
    """An eavesdropper replays the AUTH frame it saw: the server's fresh nonce makes it worthless."""
    secret = b"s3cret"
    a, b = helloed()
    t = threading.Thread(target=auth.server_handshake, args=(b, secret))
    t.start()
    challenge = a.recv(FrameType.CHALLENGE)
    nonce = os.urandom(32)
    proof = auth._proof(secret, b"client", a.sent_hello, a.peer_hello, bytes(challenge.body.nonce), nonce)
    a.send(FrameType.AUTH, {"nonce": nonce, "proof": proof})
    a.recv(FrameType.PROOF)
    t.join()
    a.close()
    b.close()

    a, b = helloed()
    with a, b:
        caught = {}

        def server():
            try:
                auth.server_handshake(b, secret)
            except AuthError as exc:
                caught["err"] = exc

        t = threading.Thread(target=server)
        t.start()
        a.recv(FrameType.CHALLENGE)
        a.send(FrameType.AUTH, {"nonce": nonce, "proof": proof})       # the recorded frame
        with pytest.raises(PeerFailed, match="authentication failed"):
            a.recv(FrameType.PROOF)
        t.join()
        assert "its proof does not match" in str(caught["err"])


def test_a_server_without_the_secret_is_found_out_by_the_client():
    """A server that answers with a proof it cannot make (it lacks the secret) is refused."""
    a, b = helloed()
    with a, b:
        def fake_server():
            b.send(FrameType.CHALLENGE, {"nonce": os.urandom(32)})
            b.recv(FrameType.AUTH)
            b.send(FrameType.PROOF, {"proof": os.urandom(32)})

        t = threading.Thread(target=fake_server)
        t.start()
        with pytest.raises(AuthError, match="failed to prove it holds the secret"):
            auth.client_handshake(a, b"s3cret")
        t.join()


@pytest.mark.parametrize("content, mode, why", [
    (b"s3cret\n", 0o644, r"accessible by group or others \(mode 0644\): chmod 600 it"),
    (b"s3cret\n", 0o640, r"accessible by group or others \(mode 0640\)"),
    (b"", 0o600, r"the secret file is empty"),
    (b"\n\n", 0o600, r"the secret file is empty"),
])
def test_a_secret_file_others_can_read_or_an_empty_one_is_refused(tmp_path, content, mode, why):
    path = tmp_path / "secret"
    path.write_bytes(content)
    path.chmod(mode)
    with pytest.raises(PycrError, match=why):
        auth.read_secret(str(path))


def test_a_good_secret_file_reads_without_its_newline(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(b"s3cret\n")
    path.chmod(0o600)
    assert auth.read_secret(str(path)) == b"s3cret"
    with pytest.raises(PycrError, match="cannot read the secret file"):
        auth.read_secret(str(tmp_path / "missing"))
