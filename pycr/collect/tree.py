"""The process tree of a frozen dump: identity and links of every process, its
unreaped zombies, fd tables shared between processes, and the session members
a dump of this tree would leave behind."""

import functools
import os

from .. import abi, options, proc
from .tty import terminal_name
from ..errors import TaskGone, Unsupported
from ..native import core


def reader(pid, threads):
    """The task whose /proc entries describe process pid: the leader, or a live
    thread once the leader has exited (a zombie leader has no mm, fds, cwd...)."""
    return threads[0].tid if threads else pid


def collect_pstree(processes, zombies=()):
    """pstree image body for `processes` ({pid: [threads, leader first]}), parents first.

    zombies: tids the freeze found dead; those that are unreaped children of the
    tree are recorded with their exit status. pgid and sid are read while the
    tree is frozen, so they cannot change under us.
    """
    shared = files_shared_with_parent(processes)
    entries = []
    for pid, threads in processes.items():
        st = proc.stat(pid)
        tids = [t.tid for t in threads]
        exited = pid not in tids
        entries.append({
            "pid": pid,
            "ppid": st.ppid,
            "pgid": st.pgrp,
            "sid": st.session,
            "start_time": st.start_time,
            "threads": tids,
            "leader_exited": exited,
            "leader_exit_code": st.exit_code if exited else 0,
            "shares_files": pid in shared,
        })
    return {"processes": order_parents_first(entries),
            "zombies": collect_zombies(zombies, processes)}


def collect_zombies(tids, processes):
    """Records of the zombie children of the tree among the dead tids.

    The parents are frozen, so none can be reaped meanwhile. A dead thread
    (not a thread-group leader) and a zombie leader whose threads still run
    (it is in processes) are not zombie processes.
    """
    out = []
    for tid in sorted(tids):
        if tid in processes:
            continue
        try:
            st = proc.stat(tid)
            status = proc.status(tid)
        except TaskGone:
            continue
        if status.tgid != tid or st.state != "Z" or st.ppid not in processes:
            continue
        out.append({"pid": tid, "ppid": st.ppid, "pgid": st.pgrp, "sid": st.session,
                    "start_time": st.start_time, "exit_code": st.exit_code, "comm": st.comm})
    return out


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


# -- fd tables shared by processes (clone with CLONE_FILES, without CLONE_THREAD)

def _files_order(a, b):
    """kcmp(KCMP_FILES) as a sort key: 0 same table, 1 / 2 an ordering of the pointers."""
    res = core.kcmp(a, b, abi.KCMP_FILES)
    return 0 if res == 0 else (-1 if res == 1 else 1)


def files_shared_with_parent(processes):
    """PIDs whose fd table is their parent's. Restore can rebuild that sharing only
    by forking the child with CLONE_FILES, so any other sharing (siblings alone,
    a process outside the tree) is refused by name."""
    tid = {pid: reader(pid, threads) for pid, threads in processes.items()}
    ppid = {pid: proc.stat(pid).ppid for pid in processes}
    ordered = sorted(processes, key=functools.cmp_to_key(lambda a, b: _files_order(tid[a], tid[b])))
    shared = set()
    i = 0
    while i < len(ordered):
        j = i + 1
        while j < len(ordered) and _files_order(tid[ordered[i]], tid[ordered[j]]) == 0:
            j += 1
        group = set(ordered[i:j])
        tops = sorted(p for p in group if ppid[p] not in group)
        if len(tops) > 1:
            raise Unsupported(f"pids {tops[0]} and {tops[1]} share one fd table (CLONE_FILES) "
                              "but neither is the other's parent: not supported")
        shared.update(group - set(tops))
        i = j
    for pid in processes:
        parent = ppid[pid]
        if parent in processes or parent <= 0:
            continue
        try:
            same = core.kcmp(tid[pid], parent, abi.KCMP_FILES) == 0
        except OSError:
            continue      # gone, or not ours to compare: it cannot share with us then
        if same:
            raise Unsupported(f"pid {pid} ({_comm(pid)}) shares its fd table (CLONE_FILES) with its "
                              f"parent pid {parent} outside the dumped tree: dump from pid {parent}")
    return shared


# -- session members the dump would leave behind

def _comm(pid):
    try:
        return proc.comm(pid)
    except TaskGone:
        return "?"


def _all_pids():
    return proc.pids()


def check_pid_namespace(processes):
    """Refuse a tree in a PID namespace below pycr's: the images would hold the PIDs
    pycr sees, not the ones the tasks use (getpid would change at restore)."""
    mine = len(proc.status(os.getpid()).nspid) or 1
    for pid in processes:
        nspid = proc.status(pid).nspid
        if len(nspid) > mine:
            raise Unsupported(f"pid {pid} ({proc.comm(pid)}) is pid {nspid[-1]} in a PID namespace below "
                              f"pycr's: dumping a nested PID namespace is not supported (run pycr inside it)")


def check_shell_job(processes, zombies=()):
    """Refuse, without -j, a tree whose session is outside it and has a controlling terminal.

    That is a job started from a shell on a terminal: a restore puts it in
    pycr's session, on pycr's terminal, which only -j (--shell-job) asks for.
    """
    if options.current().shell_job:
        return
    inside = set(processes) | set(zombies)
    for pid in processes:
        st = proc.stat(pid)
        if st.session in inside or not st.tty_nr:
            continue
        raise Unsupported(f"pid {pid} ({st.comm}) runs in session {st.session} ({_comm(st.session)}) outside the "
                          f"tree, on {terminal_name(st.tty_nr)}: a shell job; dump it with -j (--shell-job)")


def check_sessions(processes, zombies=()):
    """Refuse a tree whose sessions or process groups have live members outside it.

    A session (or group) led by a process of the tree would come back without
    them: they were re-parented away (to init or a subreaper) when their parent
    exited, and the restored session would silently lose them. A shell job
    needs -j (check_shell_job).
    """
    check_shell_job(processes, zombies)
    led_sessions, led_groups = set(), set()
    for pid in processes:
        st = proc.stat(pid)
        if st.session == pid:
            led_sessions.add(pid)
        if st.pgrp == pid:
            led_groups.add(pid)
    if not led_sessions and not led_groups:
        return
    inside = set(processes) | set(zombies)
    for pid in _all_pids():
        if pid in inside:
            continue
        try:
            st = proc.stat(pid)
        except (TaskGone, OSError):
            continue
        if st.state in "ZX":
            continue       # an orphaned zombie: its new parent reaps it
        if st.session in led_sessions:
            what = f"session {st.session}"
        elif st.pgrp in led_groups:
            what = f"process group {st.pgrp}"
        else:
            continue
        raise Unsupported(f"pid {pid} ({st.comm}) is in {what} of the dumped tree but outside the "
                          f"tree (its parent is pid {st.ppid}): it would be left behind; dump a tree "
                          f"that holds the whole {what.rsplit(' ', 1)[0]}, or let it leave first")
