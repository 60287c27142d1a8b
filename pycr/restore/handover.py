"""`pycr migrate` on one host: the replica takes the frozen source's own sockets.

While the replica is built the source still holds its sockets: their
addresses, ports, paths and connections are in use, so new ones could not be
bound or connected. The replica is given the very same open file descriptions
instead (pycr takes them from the frozen source with pidfd_getfd): a
listener keeps its accept queue, a connection its queues and sequence
numbers, a unix pair stays a pair. Nothing is lost if the migration fails:
the source is thawed with its sockets as they were; once the replica runs
the source is killed, and the sockets live on in the replica.

Ptys are handed over the same way (pycr.restore.tty). What a final pass must
take from the frozen source beyond its descriptions (a controlling terminal)
registers how to give it back (`before_thaw`): a failed migration runs those
in the still-frozen source (`give_back`) before thawing it.
"""

import os
import socket

from pycr import options
from pycr.errors import PycrError, RestoreError
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


def take_fd(holder, what):
    """pycr's fd of the source's own open file description behind holder (pid, fd)."""
    pid, fd = holder
    try:
        mine = core.dup_from(pid, fd)
    except OSError as exc:
        raise RestoreError(f"pid {pid} fd {fd}: cannot take the source's {what}: {exc.strerror}") from None
    log.info("pid %d fd %d: %s taken over from the source with pidfd_getfd", pid, fd, what)
    return mine


_give_backs = []


def before_thaw(action):
    """action(frozen) gives back to the frozen source something a final pass took from it;
    run only if the migration fails (give_back), before the source is thawed."""
    _give_backs.append(action)


def forget():
    """The migration succeeded (or starts): nothing to give back."""
    _give_backs.clear()


def give_back(frozen):
    """Run every registered give-back in the frozen source, newest first; each failure is logged."""
    actions = list(reversed(_give_backs))
    _give_backs.clear()
    for action in actions:
        try:
            action(frozen)
        except (PycrError, OSError) as exc:
            log.warning("warning: the source could not get back what the replica took: %s", exc)


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
