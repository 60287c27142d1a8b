"""Workload processes for the benchmarks: build, start, inspect, kill and reap them.

Everything is done by PID. The harness makes itself a child subreaper so that trees
restored detached (criu/pycr restore -d) are re-parented to it and can be reaped here,
instead of lingering as zombies until PID 1 gets to them.
"""

import ctypes
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKLOADS = HERE / "workloads"
CACHE = Path(os.environ.get("PYCR_BENCH_CACHE", "/var/tmp/pycr-bench"))

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_CHILD_SUBREAPER = 36


def build_workload(name="memhog"):
    """Compile benchmarks/workloads/NAME.c into the cache (again only when the source is newer)."""
    src = WORKLOADS / f"{name}.c"
    out = CACHE / "bin" / name
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(tmp), str(src)], check=True)
        os.replace(tmp, out)
    return str(out)


def become_subreaper():
    """Orphans of the trees we start or restore come to us, so we can reap them."""
    if _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def children(pid):
    """Direct children of pid, from /proc/PID/task/*/children."""
    out = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except FileNotFoundError:
            pass
    return out


def tree_pids(root):
    """root and all its descendants, parents first."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        pids.append(pid)
        todo += children(pid)
    return pids


def state(pid):
    """The one-letter state of pid, or None once it is gone (reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data[data.rindex(b")") + 2:][:1].decode()


def boot_ticks():
    """Now, in the unit of field 22 of /proc/PID/stat (clock ticks since boot)."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))


def start_ticks(pid):
    """When pid started (field 22 of /proc/PID/stat), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(data[data.rindex(b")") + 2:].split()[19])


def reap(pids, timeout=10.0, stop=None, poll=0.02):
    """Wait until none of pids exists any more; reap those that are our children.

    Returns the pids still present after timeout, or when the Event stop is set.
    """
    left = set(pids)
    deadline = time.monotonic() + timeout
    while left and not (stop and stop.is_set()):
        for pid in list(left):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done == pid:
                    left.discard(pid)
                    continue
            except ChildProcessError:
                pass
            if state(pid) is None:
                left.discard(pid)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(poll)
    return sorted(left)


class TimedRun:
    """One finished command: returncode, seconds (from just before the fork to its exit), rusage."""

    def __init__(self, returncode, seconds, rusage):
        self.returncode, self.seconds, self.rusage = returncode, seconds, rusage


def run_timed(argv, stdout, env=None, timeout=600.0):
    """Run argv (stdin /dev/null, stderr into stdout) to its end -> TimedRun.

    The exit is waited for without polling: a pidfd becomes readable the moment the
    process exits, and poll() wakes on it (subprocess's timed wait sleeps in steps of
    up to 50 ms, which would round every figure up). Where the kernel has no pidfd, a
    thread blocks in wait4 instead. Raises subprocess.TimeoutExpired after timeout s,
    once the command is killed (by its PID) and reaped.
    """
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.STDOUT,
                            close_fds=True, env=env)
    exited = _wait_exit(proc.pid, timeout)
    ended = time.perf_counter()
    if not exited:
        os.kill(proc.pid, signal.SIGKILL)
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if not exited:
        raise subprocess.TimeoutExpired(argv, timeout)
    return TimedRun(proc.returncode, ended - started, rusage)


def _wait_exit(pid, timeout):
    """True once pid (our child) has exited, False after timeout s; it is not reaped here."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return _wait_exit_thread(pid, timeout)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(int(timeout * 1000)))
    finally:
        os.close(pidfd)


def _wait_exit_thread(pid, timeout):
    """Without pidfds: a thread blocks in waitid(WEXITED | WNOWAIT), which leaves the child unreaped."""
    done = threading.Event()

    def wait():
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        done.set()

    threading.Thread(target=wait, daemon=True).start()
    return done.wait(timeout)


def reap_on_exit(pids, stop_fd, timeout=3600.0):
    """Reap pids the moment each exits, until all are gone or stop_fd becomes readable.

    Each pid's pidfd wakes poll() at its exit (no sleep between checks, so a tool that
    waits for the PIDs to be free is not kept waiting by us). A zombie that is not our
    child yet (its parent, in the same tree, is still exiting) is reaped once that
    parent's exit has re-parented it to us, a child subreaper. Returns the pids left.
    """
    fds, left = {}, set(pids)
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            left.discard(pid)
        except (AttributeError, OSError):    # no pidfds here: the polling reaper
            for fd in fds:
                os.close(fd)
            return reap(pids, timeout, _FdEvent(stop_fd), poll=0.001)
    poller = select.poll()
    poller.register(stop_fd, select.POLLIN)
    for fd in fds:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    exited = set()
    try:
        while left:
            # pending zombies and no pidfd left to wake us: their re-parenting is a matter of µs
            wait_ms = 1 if exited and not fds else max(int((deadline - time.monotonic()) * 1000), 0)
            ready = poller.poll(wait_ms)
            if any(fd == stop_fd for fd, _ in ready) or time.monotonic() > deadline:
                break
            for fd, _ in ready:
                poller.unregister(fd)
                exited.add(fds.pop(fd))
                os.close(fd)
            for pid in list(exited):
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = 0
                if done == pid or state(pid) is None:
                    exited.discard(pid)
                    left.discard(pid)
    finally:
        for fd in fds:
            os.close(fd)
    return sorted(left)


class _FdEvent:
    """An Event-like view of a pipe's read end (readable = set), for reap()."""

    def __init__(self, fd):
        self.fd = fd

    def is_set(self):
        return bool(select.select([self.fd], [], [], 0)[0])


def kill_pids(pids, timeout=10.0):
    """SIGKILL each pid (by PID, never by name), then reap them. Returns leftovers."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return reap(pids, timeout)


class Workload:
    """A running memhog tree: MIB of pseudo-random memory over NPROC processes.

    Started in its own session with a clean fd table (stdin /dev/null, stdout and
    stderr an O_APPEND log file), so both tools see the same, simple tree.
    """

    def __init__(self, mib, nproc=1, rate_pct=0.0, workdir=None):
        self.mib, self.nproc, self.rate_pct = mib, nproc, rate_pct
        self.workdir = Path(workdir or CACHE / "run")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.out_path = self.workdir / f"memhog-{os.getpid()}-{time.monotonic_ns()}.out"
        self.proc = None
        self.pids = []
        self.started = None

    def start(self, timeout=120.0):
        exe = build_workload()
        self.started = boot_ticks()  # same clock and truncation as the kernel's start_time
        fd = os.open(self.out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        try:
            self.proc = subprocess.Popen(
                [exe, str(self.mib), str(self.rate_pct), str(self.nproc)],
                stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, close_fds=True, start_new_session=True)
        finally:
            os.close(fd)
        self.pids = [self.proc.pid]
        deadline = time.monotonic() + timeout
        while len(self._lines("ready")) < self.nproc:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"memhog {self.mib} MiB x{self.nproc} did not get ready: {self.out_path}")
            time.sleep(0.02)
        self.pids = tree_pids(self.proc.pid)
        return self

    @property
    def root(self):
        return self.pids[0]

    def _lines(self, kind):
        try:
            text = self.out_path.read_text()
        except FileNotFoundError:
            return []
        return [line.split() for line in text.splitlines() if line.startswith(kind + " ")]

    def checksums(self, timeout=60.0):
        """Ask every process for its memory checksum: {pid: (ticks, checksum)}."""
        before = len(self._lines("sum"))
        for pid in self.pids:
            os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while True:
            new = self._lines("sum")[before:]
            if len(new) >= len(self.pids) or time.monotonic() > deadline:
                return {int(p): (int(t), s) for _, p, t, s in new}
            time.sleep(0.02)

    def alive(self):
        return all(state(pid) not in (None, "Z") for pid in self.pids)

    def reap_during(self):
        """Reap the tree as soon as it dies, from a thread, while a dump runs.

        A dump kills the tree; like a shell would, its parent (we) reaps it at once.
        A tool that waits for the PIDs to be free before it returns (so a restore can
        follow) would otherwise wait for us, while we wait for it.
        """
        self._stop_r, self._stop_w = os.pipe()
        self._left = list(self.pids)

        def run():
            self._left = reap_on_exit(self.pids, self._stop_r)
            if self.proc is not None and self.proc.pid not in self._left:
                self.proc.returncode = self.proc.returncode or -signal.SIGKILL

        self._reaper = threading.Thread(target=run, daemon=True)
        self._reaper.start()

    def wait_dumped(self, timeout=10.0):
        """After the dump returned: the PIDs still present after timeout (should be none)."""
        self._reaper.join(timeout)
        os.write(self._stop_w, b"x")
        self._reaper.join()
        os.close(self._stop_r)
        os.close(self._stop_w)
        return reap(self._left, 0.1)

    def kill(self):
        """Kill every process of the tree (original or restored) by PID and reap it.

        Only PIDs whose process started after this workload did are touched: after a
        failed restore a PID may already belong to something else that is older.
        """
        if self.started is None:
            return []
        pids = set()
        for pid in self.pids:
            if (start_ticks(pid) or -1) >= self.started:
                pids.update(p for p in tree_pids(pid) if (start_ticks(p) or -1) >= self.started)
        left = kill_pids(sorted(pids))
        if self.proc is not None:
            try:
                self.proc.wait(1)
            except subprocess.TimeoutExpired:
                pass
        return left

    def cleanup(self):
        self.kill()
        try:
            self.out_path.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cleanup()


class HoleTarget:
    """A process holding SIZE bytes of mapped but never touched private anonymous memory.

    The restore case: process_vm_writev into it has to fault in fresh pages.
    """

    CODE = (
        "import ctypes, mmap, sys, time\n"
        "m = mmap.mmap(-1, int(sys.argv[1]), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)\n"
        "print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)\n"
        "time.sleep(3600)\n"
    )

    def __init__(self, size):
        self.size = size
        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE, str(size)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, close_fds=True)
        try:
            self.addr = int(self.proc.stdout.readline())
        except ValueError:
            self.close()
            raise RuntimeError("hole target did not report its address")
        self.pid = self.proc.pid

    def close(self):
        kill_pids([self.proc.pid])
        self.proc.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def find_region(pid, min_size):
    """Start of the first private anonymous VMA of pid at least min_size long."""
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if end - start >= min_size and len(fields) == 5 and fields[1].endswith("p"):
                return start
    raise RuntimeError(f"pid {pid}: no anonymous mapping of {min_size} bytes")
