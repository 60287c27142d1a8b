"""Independent readers of /proc for the tests.

Deliberately separate from pycr's own /proc code: tests observe processes with
these few lines so that they never trust the code under test. Readers return
None (or an empty list) for a task that is gone, instead of raising.
"""

import os
import random
import signal
import time
import zlib

WALL = 0x40000000  # __WALL: also reap clones and tasks we trace


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None


def stat(pid, tid=None):
    """Fields of /proc/PID[/task/TID]/stat by name, or None if the task is gone.

    comm may hold spaces and parentheses, so the line is split at the last ')'.
    """
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    raw = _read(path)
    if raw is None:
        return None
    text = raw.decode(errors="surrogateescape")
    head, _, tail = text.rpartition(")")
    rest = tail.split()
    return {
        "pid": int(head.split("(", 1)[0]),
        "comm": head.split("(", 1)[1],
        "state": rest[0],
        "ppid": int(rest[1]),
        "pgid": int(rest[2]),
        "sid": int(rest[3]),
        "tty_nr": int(rest[4]),         # the controlling terminal, encoded (see tty_dev)
        "tpgid": int(rest[5]),          # its foreground process group
        "start_time": int(rest[19]),
    }


def _stat_field(pid, name):
    st = stat(pid)
    return None if st is None else st[name]


def ppid(pid):
    return _stat_field(pid, "ppid")


def pgid(pid):
    return _stat_field(pid, "pgid")


def sid(pid):
    return _stat_field(pid, "sid")


def tty_dev(pid):
    """The device number of pid's controlling terminal (0 if none), decoded from tty_nr."""
    nr = _stat_field(pid, "tty_nr")
    return None if nr is None else os.makedev((nr >> 8) & 0xFFF, (nr & 0xFF) | ((nr >> 12) & 0xFFF00))


def state(pid, tid=None):
    """One-letter state (R, S, D, T, t, Z, X, ...), or None if gone."""
    st = stat(pid, tid)
    return None if st is None else st["state"]


def start_time(pid):
    """Field 22 of stat: with the pid, it names one process across PID reuse."""
    return _stat_field(pid, "start_time")


def status(pid):
    """/proc/PID/status as a dict of str -> str, or None if gone."""
    raw = _read(f"/proc/{pid}/status")
    if raw is None:
        return None
    out = {}
    for line in raw.decode(errors="surrogateescape").splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def tracer_pid(pid):
    st = status(pid)
    return None if st is None else int(st["TracerPid"])


def thread_names(pid):
    """{tid: name} of every thread of a process (/proc/PID/task/TID/comm)."""
    out = {}
    for tid in threads(pid):
        raw = _read(f"/proc/{pid}/task/{tid}/comm")
        if raw is not None:
            out[tid] = raw.decode(errors="replace").strip()
    return out


def threads(pid):
    """Sorted TIDs of a process (the leader included); [] if gone."""
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except (FileNotFoundError, ProcessLookupError):
        return []


def children(pid):
    """Direct children, from every thread's task/TID/children file."""
    found = []
    for tid in threads(pid):
        raw = _read(f"/proc/{pid}/task/{tid}/children")
        if raw:
            found.extend(int(c) for c in raw.split())
    return sorted(set(found))


def descendants(pid):
    """Every process below pid (children, grandchildren, ...), sorted."""
    seen, todo = set(), [pid]
    while todo:
        for child in children(todo.pop()):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return sorted(seen)


def all_pids():
    return sorted(int(d) for d in os.listdir("/proc") if d.isdigit())


def session_members(session_id):
    """Every process whose session id is session_id (catches orphans of a tree)."""
    out = []
    for pid in all_pids():
        st = stat(pid)
        if st is not None and st["sid"] == session_id:
            out.append(pid)
    return out


def exists(pid):
    """True while /proc/PID exists, zombies included: the PID is still taken."""
    return os.path.exists(f"/proc/{pid}")


def is_zombie(pid):
    return state(pid) == "Z"


def try_reap(pid):
    """Reap pid if it is our child or our tracee and has exited; ignore others.

    Threads we trace are reaped one by one too: a killed process whose
    threads we traced stays a zombie until the tracer has waited for each."""
    for tid in [t for t in threads(pid) if t != pid] + [pid]:
        try:
            os.waitpid(tid, os.WNOHANG | WALL)
        except ChildProcessError:
            pass


def wait_until(check, timeout=10.0, interval=0.01):
    """Call check() until it returns something true or timeout seconds have passed;
    return its last value, so a caller asserts it: `assert wait_until(...), why`.
    The one polling loop of the tests: wait for an event with it, never with a bare sleep."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def pending_signals(pid):
    """Signal numbers pending for pid (its own and its thread group's queue); None if gone."""
    st = status(pid)
    if st is None:
        return None
    bits = int(st["SigPnd"], 16) | int(st["ShdPnd"], 16)
    return {n for n in range(1, 65) if bits & (1 << (n - 1))}


def wait_gone(pids, timeout=10.0):
    """Wait until none of pids is in /proc (reaping ours on the way); return those left."""
    left = set(pids)
    deadline = time.monotonic() + timeout
    while True:
        for pid in list(left):
            try_reap(pid)
            if not exists(pid):
                left.discard(pid)
        if not left or time.monotonic() >= deadline:
            return sorted(left)
        time.sleep(0.01)


def ancestors(pid):
    """pid's parent, grandparent, ... up to PID 1."""
    out = []
    while True:
        pid = ppid(pid)
        if not pid:
            return out
        out.append(pid)


def kill(pid, sig=signal.SIGKILL):
    """Send sig to pid; False if it is already gone.

    Refuses PID 1, our own process and its ancestors, so a stale PID in a
    cleanup list can never take the test run down."""
    if pid <= 1 or pid == os.getpid() or pid in ancestors(os.getpid()):
        raise ValueError(f"refusing to signal pid {pid}")
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def pid_max():
    with open("/proc/sys/kernel/pid_max") as f:
        return int(f.read())


def free_pids(count=1, contiguous=False, low=None, high=None):
    """PIDs not in use now, from the upper part of the PID space (away from the
    ones fork hands out next). Only a snapshot: another fork may take them."""
    high = high or pid_max() - 1
    low = low or max(300, high // 2)
    used = set(all_pids())
    for _ in range(1000):
        if contiguous:
            start = random.randint(low, high - count)
            block = list(range(start, start + count))
            if not used.intersection(block):
                return block
        else:
            picks = set()
            while len(picks) < count:
                pid = random.randint(low, high)
                if pid not in used:
                    picks.add(pid)
            return sorted(picks)
    raise RuntimeError(f"no {count} free pids found between {low} and {high}")


def read_memory(pid, addr, length):
    """Bytes of another process's memory through /proc/PID/mem."""
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        f.seek(addr)
        chunks, left = [], length
        while left:
            chunk = f.read(min(left, 64 << 20))
            if not chunk:
                raise EOFError(f"pid {pid}: short read at {addr + length - left:#x}")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)


def checksum(*chunks):
    """The workloads' 64-bit sum (wl.h) over chunks taken in order: crc32 << 32 | adler32."""
    crc, adler = 0, 1
    for chunk in chunks:
        crc = zlib.crc32(chunk, crc)
        adler = zlib.adler32(chunk, adler)
    return (crc << 32) | adler


def maps(pid):
    """(start, end, perms, path) of every mapping; [] if gone."""
    raw = _read(f"/proc/{pid}/maps")
    if raw is None:
        return []
    out = []
    for line in raw.decode(errors="surrogateescape").splitlines():
        parts = line.split(None, 5)
        start, end = (int(x, 16) for x in parts[0].split("-"))
        out.append((start, end, parts[1], parts[5] if len(parts) > 5 else ""))
    return out


def fds(pid):
    """fd number -> readlink target of every open fd; {} if gone."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, ProcessLookupError):
        return {}
    out = {}
    for name in names:
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            pass
    return out


def coalesced_maps(pid):
    """(start, end, perms, path) of pid's mappings, neighbours with the same perms and
    path merged: what a restore must reproduce, whatever the kernel split or merged."""
    out = []
    for start, end, perms, path in maps(pid):
        if out and out[-1][1] == start and out[-1][2:] == (perms, path):
            out[-1] = (out[-1][0], end, perms, path)
        else:
            out.append((start, end, perms, path))
    return out


def assert_running_untraced(*pids):
    """Every thread of pids runs: none traced, stopped, or gone."""
    for pid in pids:
        assert tracer_pid(pid) == 0, f"pid {pid} is still traced"
        for tid in threads(pid):
            assert state(pid, tid) not in ("t", "T", "Z", None), f"tid {tid} of pid {pid} is {state(pid, tid)}"


def smaps_field(pid, addr, name):
    """The text after `name:` in the smaps entry of the VMA holding addr, or None."""
    current = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and ":" not in head:
                start, end = (int(x, 16) for x in head.split("-"))
                current = start <= addr < end
            elif line.startswith(name + ":") and current:
                return line.split(":", 1)[1].strip()
    return None
