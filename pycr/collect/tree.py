"""The process tree of a frozen dump: identity and links of every process."""

from .. import proc


def collect_pstree(processes):
    """pstree image body for `processes` ({pid: [threads, leader first]}), parents first.

    pgid and sid are read while the tree is frozen, so they cannot change under us.
    """
    entries = []
    for pid, threads in processes.items():
        st = proc.stat(pid)
        entries.append({
            "pid": pid,
            "ppid": st.ppid,
            "pgid": st.pgrp,
            "sid": st.session,
            "start_time": st.start_time,
            "threads": [t.tid for t in threads],
        })
    return {"processes": order_parents_first(entries)}


def order_parents_first(entries):
    """Sort so that every process comes after its parent (restore forks in this order)."""
    by_pid = {e["pid"]: e for e in entries}
    placed, out = set(), []

    def place(e):
        if e["pid"] in placed:
            return
        parent = by_pid.get(e["ppid"])
        if parent is not None and parent is not e:
            place(parent)
        placed.add(e["pid"])
        out.append(e)

    for e in sorted(entries, key=lambda e: e["pid"]):
        place(e)
    return out
