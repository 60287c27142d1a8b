"""`pycr migrate` on one host: the replica takes the frozen source's own sockets.

While the replica is built the source still holds its sockets: their
addresses, ports, paths and connections are in use, so new ones could not be
bound or connected. The replica is given the very same open file descriptions
instead (pycr takes them from the frozen source with pidfd_getfd): a
listener keeps its accept queue, a connection its queues and sequence
numbers, a unix pair stays a pair. Nothing is lost if the migration fails:
the source is thawed with its sockets as they were; once the replica runs
the source is killed, and the sockets live on in the replica.
"""

import os
import socket

from pycr import options
from pycr.errors import RestoreError
from pycr.log import log
from pycr.native import core


def active():
    """Is this restore the final pass of `pycr migrate` on one host?"""
    return options.current().socket_handover


def holders(images):
    """{file_id: (pid, fd)}: one fd of the dumped tree holding each open file description."""
    out = {}
    for p in images.processes:
        for rec in p.fds:
            out.setdefault(rec.file_id, (p.pid, rec.fd))
    return out


def take_over(holder, inode, what):
    """The source's own socket behind holder (pid, fd), checked to be inode `inode`."""
    pid, fd = holder
    try:
        mine = core.dup_from(pid, fd)
    except OSError as exc:
        raise RestoreError(f"pid {pid} fd {fd}: cannot take the source's socket: {exc.strerror}") from None
    if os.fstat(mine).st_ino != inode:
        os.close(mine)
        raise RestoreError(f"pid {pid} fd {fd}: the source's socket is no longer the one dumped")
    log.info("pid %d fd %d: %s taken over from the source with pidfd_getfd", pid, fd, what)
    return socket.socket(fileno=mine)
