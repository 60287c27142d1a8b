"""The lazy-pages socket: SOCK_SEQPACKET, one JSON object per message, fds alongside (SCM_RIGHTS).

restore -> daemon                                   daemon -> restore
  {"op": "hello", "set_id": HEX}                      {"ok": true} | {"ok": false, "error": TEXT}
  {"op": "process", "pid", "real", "runs"}            {"ok": true} | ...     fds: [uffd, pidfd]
      runs: [[start, end, wipe_on_fork], ...] the ranges registered (MISSING) in that uffd
  {"op": "go"}                                        {"ok": true}: the tree may run
The restore closes the socket after "go"; a socket closed before it means the restore failed.
"""

import contextlib
import json
import os
import socket

from ..errors import PycrError

SOCKET_NAME = "lazy-pages.sock"
MAX_MESSAGE = 1 << 20
MAX_FDS = 4


class ProtocolError(PycrError):
    pass


SUN_PATH_MAX = 107                  # sockaddr_un's sun_path: 108 bytes with the NUL


def socket_path(work_dir):
    return os.path.join(work_dir, SOCKET_NAME)


@contextlib.contextmanager
def addressable(path):
    """The name by which to bind or connect the socket at `path`: itself when it fits in sun_path, else the
    same file reached through an O_PATH fd of its directory (/proc/self/fd/N/NAME), so that a work
    directory deep in the tree still works."""
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        yield path
        return
    fd = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{os.path.basename(path)}"
    finally:
        os.close(fd)


def send(sock, obj, fds=()):
    data = json.dumps(obj).encode()
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


def recv(sock):
    """(message, [fds]) or (None, []) at end of stream."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    try:
        return json.loads(data), fds
    except ValueError:
        for fd in fds:
            os.close(fd)
        raise ProtocolError("lazy-pages: a malformed message on the socket") from None


def call(sock, obj, fds=()):
    """send, then wait for the answer; raise if the peer refused or went away."""
    send(sock, obj, fds)
    reply, extra = recv(sock)
    for fd in extra:
        os.close(fd)
    if reply is None:
        raise ProtocolError("the lazy-pages daemon went away")
    if not reply.get("ok"):
        raise ProtocolError(f"the lazy-pages daemon refused: {reply.get('error', '?')}")
    return reply
