"""Threads and children of a task: /proc/PID/task and .../children.

children is the union over every thread, since each thread's file lists only
the children that thread forked.
"""

from pycr.errors import TaskGone
from pycr.proc._read import listdir, read_text


def tasks(pid):
    """TIDs of process pid, the leader first."""
    tids = sorted(int(t) for t in listdir(pid, "task"))
    if pid in tids:
        tids.remove(pid)
        tids.insert(0, pid)
    return tids


def children(pid):
    """PIDs of the children of process pid, sorted."""
    found = set()
    for tid in tasks(pid):
        try:
            found.update(int(c) for c in read_text(pid, "children", tid).split())
        except TaskGone:
            if tid == pid:
                raise
    return sorted(found)


def descendants(pid):
    """pid and every process below it, each parent before its children."""
    order, queue = [], [pid]
    while queue:
        cur = queue.pop(0)
        order.append(cur)
        try:
            queue.extend(children(cur))
        except TaskGone:
            if cur == pid:
                raise
    return order
