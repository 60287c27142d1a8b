"""Which tasks the replica must lose, gain or re-create between two passes.

A process is the same across passes if it keeps its PID and its start time
(a reused PID is another process). A process whose parent changed (its parent
died and it was re-parented, to a subreaper inside the tree) cannot be moved
under its new parent: Linux has no re-parenting call. It is re-created
instead: killed in the replica and forked again from the new parent with its
PID, then rebuilt with all of its memory. The same holds for every process
whose replica parent is removed or re-created, since killing that parent
would orphan it in the replica.
"""

from dataclasses import dataclass, field


@dataclass
class Node:
    pid: int
    ppid: int
    start_time: int


@dataclass
class TreeDiff:
    kept: list = field(default_factory=list)        # same process, same parent (new order)
    removed: list = field(default_factory=list)     # to kill, children before parents
    added: list = field(default_factory=list)       # to fork, parents before children
    recreated: set = field(default_factory=set)     # in both removed and added

    @property
    def empty(self):
        return not self.removed and not self.added


def nodes_of(pstree):
    """[Node] from a pstree image, in its order (parents first)."""
    return [Node(p.pid, p.ppid, p.start_time) for p in pstree.processes]


def diff(old, new):
    """TreeDiff from the replica's tree `old` to the pass's tree `new` (lists of Node, parents first).

    The root (first node) is never re-created: its parent is outside the tree.
    """
    old_by = {n.pid: n for n in old}
    new_by = {n.pid: n for n in new}
    root = new[0].pid if new else None

    def same(pid):
        return pid in old_by and pid in new_by and old_by[pid].start_time == new_by[pid].start_time

    gone = {pid for pid in old_by if not same(pid)}
    moved = set()
    for n in new:
        if n.pid == root or not same(n.pid):
            continue
        # new is parents first, so a re-created parent is already in moved.
        if old_by[n.pid].ppid != n.ppid or n.ppid in moved or n.ppid in gone:
            moved.add(n.pid)
    out = TreeDiff()
    out.removed = [n.pid for n in reversed(old) if n.pid in gone or n.pid in moved]
    out.added = [n.pid for n in new if not same(n.pid) or n.pid in moved]
    out.kept = [n.pid for n in new if same(n.pid) and n.pid not in moved]
    out.recreated = moved & set(out.added)
    return out
