"""A unix socket's queued data, read without consuming it (MSG_PEEK).

A stream socket's bytes usually come in one peek. Past the first message of
a datagram or seqpacket queue (or a stream queue cut where SO_PASSCRED keeps
writers apart), peeking needs SO_PEEK_OFF: pycr sets it to 0, peeks message
after message (each peek moves it on) and puts the program's value back.
SO_PEEK_OFF belongs to the socket, so the tree sees it: before changing it,
pycr writes the original value to a journal (one file per socket, named by
inode and sock_diag cookie, which is never reused while the machine runs)
and removes the file once the value is back. A pycr killed in between leaves
the file: `pycr check -t`/`pycr cleanup -t` (pycr/leftovers.py) and the next
dump find it and put the value back.
"""

import os
import socket
import struct

from .. import abi
from ..errors import Unsupported

ANCILLARY = 8192


def journal_dir():
    """Where pycr records the SO_PEEK_OFF it changes (PYCR_RUN_DIR, else /run/pycr or $XDG_RUNTIME_DIR/pycr)."""
    if os.environ.get("PYCR_RUN_DIR"):
        return os.environ["PYCR_RUN_DIR"]
    if os.geteuid() == 0 or not os.environ.get("XDG_RUNTIME_DIR"):
        return "/run/pycr"
    return os.path.join(os.environ["XDG_RUNTIME_DIR"], "pycr")


def journal_path(ino, cookie):
    return os.path.join(journal_dir(), f"peek-off-{ino}-{cookie}")


def journaled(ino, cookie):
    """The SO_PEEK_OFF a killed pycr recorded for this socket, or None."""
    try:
        with open(journal_path(ino, cookie)) as f:
            return int(f.read().strip())
    except (FileNotFoundError, ValueError):
        return None


def _record(ino, cookie, value):
    where = journal_dir()
    os.makedirs(where, mode=0o700, exist_ok=True)
    path = journal_path(ino, cookie)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{value}\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def forget(ino, cookie):
    try:
        os.unlink(journal_path(ino, cookie))
    except FileNotFoundError:
        pass


def get_peek_off(sock):
    return struct.unpack("i", sock.getsockopt(socket.SOL_SOCKET, abi.SO_PEEK_OFF, 4))[0]


def set_peek_off(sock, value):
    sock.setsockopt(socket.SOL_SOCKET, abi.SO_PEEK_OFF, struct.pack("i", value))


def put_back(sock, ino, cookie):
    """Give the socket the SO_PEEK_OFF a killed pycr recorded; -> that value, or None if none was."""
    value = journaled(ino, cookie)
    if value is not None:
        set_peek_off(sock, value)
        forget(ino, cookie)
    return value


def _address(raw):
    """recvmsg's sender address as the kernel's bytes (path without NUL, abstract with its \\0)."""
    if raw is None:
        return b""
    return os.fsencode(raw) if isinstance(raw, str) else bytes(raw)


def _peek_one(sock, size, who):
    """One MSG_PEEK: (data, sender) or None when nothing (more) is queued."""
    try:
        data, anc, flags, addr = sock.recvmsg(size, ANCILLARY, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == abi.SCM_RIGHTS:
            fds = struct.unpack(f"{len(payload) // 4}i", payload[: len(payload) // 4 * 4])
            for fd in fds:             # the peek gave pycr copies: drop them
                os.close(fd)
            raise Unsupported(f"{who}: unix socket has file descriptors in flight (SCM_RIGHTS) in its queue")
    if flags & socket.MSG_CTRUNC:
        raise Unsupported(f"{who}: unix socket has more ancillary data queued than pycr can read")
    if flags & socket.MSG_TRUNC:
        raise Unsupported(f"{who}: unix socket has a message larger than {size} bytes queued")
    return data, _address(addr)


def peek_queue(sock, sk, who):
    """[(data, sender address)] queued in sock (sk: its unixdiag record), oldest first; nothing consumed."""
    stream = sk.type == socket.SOCK_STREAM
    dgram = sk.type == socket.SOCK_DGRAM
    closed_for_reading = bool(sk.shutdown & 1)
    size = max(sk.rqueue, 1 << 16) if stream else max(sk.rqueue, _rcvbuf(sock), 1 << 16)
    prior = get_peek_off(sock)
    recorded = journaled(sk.ino, sk.cookie)
    if recorded is not None:          # a killed pycr left its value: the program's is the recorded one
        prior = recorded
    if prior < 0 and recorded is None:
        first = _peek_one(sock, size, who)
        if first is None or (not dgram and not first[0]):
            return []
        if not dgram and len(first[0]) == sk.rqueue:
            return [first]            # the whole queue in one peek: SO_PEEK_OFF untouched
    if recorded is None:
        try:
            _record(sk.ino, sk.cookie, prior)
        except OSError as exc:
            raise Unsupported(f"{who}: unix socket queue needs SO_PEEK_OFF changed, and pycr cannot record "
                              f"its value first in {journal_dir()}: {exc.strerror} (set PYCR_RUN_DIR)") from None
    try:
        set_peek_off(sock, 0)
        out, total = [], 0
        while True:
            got = _peek_one(sock, size, who)
            if got is None:
                break
            if not got[0] and (not dgram or closed_for_reading):
                break                 # EOF: nothing queued, no more to come
            out.append(got)
            total += len(got[0])
            if not dgram and total >= sk.rqueue:
                break
            if len(out) > 1 << 20:
                raise Unsupported(f"{who}: unix socket queue does not end")
    finally:
        set_peek_off(sock, prior)
        forget(sk.ino, sk.cookie)
    if not dgram and total != sk.rqueue:
        raise Unsupported(f"{who}: unix socket has {sk.rqueue} bytes queued, only {total} could be read")
    return out


def _rcvbuf(sock):
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
