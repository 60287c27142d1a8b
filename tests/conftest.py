"""Fixtures shared by every test: the built workloads, a way to start them,
cleanup that always kills what a test started, and a per-test time limit.

Fixtures:
  workloads     (session) name -> path of the built workload binary
  spawn         spawn(name, *args, ready=True, status=True) -> Workload
  cleanup_pids  cleanup_pids.add(*pids): more PIDs (e.g. a restored tree) to kill at teardown

Time limit: each test's call phase gets SIGALRM after 120 s (PYCR_TEST_TIME_LIMIT,
or @pytest.mark.time_limit(seconds)); past that plus 60 s, faulthandler dumps
every thread's stack and exits, so a hung test cannot hold CI forever.
"""

import faulthandler
import itertools
import os
import re
import select
import signal
import subprocess
import threading
import time

import pytest

import procutil

# numpy's BLAS (imported with matplotlib by the dirty-map tests) would otherwise start a pool of
# threads in this process that do not block SIGCHLD: from then on pycr's stop waits in this process
# can no longer sleep on SIGCHLD and poll instead, and test_freeze checks the sleeping path.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
import workloads as workload_sources

DEFAULT_TIME_LIMIT = float(os.environ.get("PYCR_TEST_TIME_LIMIT", "120"))
HARD_LIMIT_MARGIN = 60.0
READY_TIMEOUT = 10.0
GONE_TIMEOUT = 10.0
_serial = itertools.count()


# ---------------------------------------------------------------- time limit

class TimeLimitExceeded(Exception):
    """Raised in the main thread when a test runs past its time limit."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "time_limit(seconds): time limit of the test's call phase (default 120 s)")
    config.addinivalue_line(
        "markers", "big: moves a GiB or more (tens of seconds); -m 'not big' or PYCR_SKIP_BIG=1 skips it")


def _time_limit(item):
    marker = item.get_closest_marker("time_limit")
    return float(marker.args[0]) if marker else DEFAULT_TIME_LIMIT


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    # Hard backstop over setup, call and teardown: dump stacks and exit.
    faulthandler.dump_traceback_later(_time_limit(item) + HARD_LIMIT_MARGIN, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    # Soft limit over the call phase only, so fixture teardown (the cleanup of
    # processes) is never interrupted by it.
    limit = _time_limit(item)

    def on_alarm(signum, frame):
        raise TimeLimitExceeded(f"{item.nodeid} ran over its {limit:g} s limit")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- killing

def kill_tree(roots, session=None, timeout=GONE_TIMEOUT):
    """SIGKILL roots, all their descendants and (if given) every member of the
    session, by PID, until nothing of it is left alive; then wait until all
    those PIDs have left /proc, reaping the ones that are our children or our
    tracees. Works on stopped and ptraced tasks (SIGKILL needs no consent).
    Returns the PIDs still present after timeout."""
    killed = set()
    for round_ in range(100):
        targets = set()
        for root in roots:
            if procutil.exists(root):
                targets.add(root)
                targets.update(procutil.descendants(root))
        if session:
            targets.update(procutil.session_members(session))
        live = [p for p in targets if _is_live(p)]
        if not live:
            break
        # Leaves first: a parent that is still running reaps its killed
        # children at once, instead of leaving orphans for PID 1 to reap late.
        # A running parent also gets a moment (up to 30 rounds) to reap its
        # zombies; a stopped or traced one (T, t) will not, so it goes at once.
        leaves = [p for p in live if not any(
            _is_live(c) or (procutil.state(c) == "Z" and round_ < 30
                            and procutil.state(p) in ("R", "S", "D"))
            for c in procutil.children(p))]
        for pid in (leaves if round_ < 99 else live):
            try:
                procutil.kill(pid, signal.SIGKILL)
            except ValueError:
                continue  # our own process or an ancestor: never
            killed.add(pid)
        time.sleep(0.01)
    return procutil.wait_gone(killed | {r for r in roots if procutil.exists(r)}, timeout)


def _is_live(pid):
    """Running, or a zombie thread-group leader whose other threads still run."""
    state = procutil.state(pid)
    if state == "Z":
        return len(procutil.threads(pid)) > 1
    return state not in (None, "X")


def _describe(pids):
    return ", ".join(f"{p} ({procutil.state(p)}, ppid {procutil.ppid(p)})" for p in pids)


# ---------------------------------------------------------------- workloads

@pytest.fixture(scope="session")
def workloads(tmp_path_factory):
    """Build every C workload once per session; name -> binary path."""
    return workload_sources.build(str(tmp_path_factory.mktemp("workloads")))


class Workload:
    """One started workload (the root of its process tree).

    The root is started in a new session (so it is a session leader, sid ==
    pid, and every process of its tree can be found by sid), with only fds
    0, 1, 2: stdin /dev/null, stdout+stderr to log_path. Its reports go to
    status_path. A thread reaps the root as soon as it exits (so a dump that
    kills the tree frees the PID at once) without touching ptrace stops: it
    waits on a pidfd. Methods never assume the root is still our child, so
    the object keeps working for a tree restored with the same PIDs.
    """

    def __init__(self, name, argv, workdir, status=True):
        self.name = name
        self.argv = list(argv)
        base = os.path.join(workdir, f"{name}-{next(_serial)}")
        self.log_path = base + ".log"
        self.status_path = base + ".status" if status else self.log_path
        cmd = [self.argv[0], self.status_path if status else "-", *self.argv[1:]]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                close_fds=True, start_new_session=True, cwd=workdir)
        self.pid = self.proc.pid
        self.start_time = procutil.start_time(self.pid)
        self.exit_status = None  # os.waitid result once the original root was reaped
        self.ready = None
        self._pidfd = os.pidfd_open(self.pid)
        self._reaper = threading.Thread(target=self._reap_when_exited, daemon=True,
                                        name=f"reaper-{self.pid}")
        self._reaper.start()

    def _reap_when_exited(self):
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        while not poller.poll(1000):
            pass
        # POLLIN comes at exit, but while a tracer (pycr) still holds the dead
        # task the parent cannot reap it yet: retry until it can.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                self.exit_status = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG)
            except ChildProcessError:
                break  # reaped by someone else (e.g. a tracer's waitpid)
            if self.exit_status is not None:
                break
            time.sleep(0.005)
        self.proc.returncode = -1  # Popen must not wait on a PID that may be reused
        os.close(self._pidfd)

    def __repr__(self):
        return f"<Workload {self.name} pid {self.pid}>"

    # -- the status channel

    def text(self):
        """The whole status file (undecodable bytes replaced)."""
        try:
            with open(self.status_path, "rb") as f:
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def lines(self, start=0):
        """Complete lines of the status file, from line index start on."""
        text = self.text()
        if not text.endswith("\n"):
            text = text.rpartition("\n")[0]
        return text.splitlines()[start:]

    def mark(self):
        """The current line count: pass as start= to wait for a newer report."""
        return len(self.lines())

    def last(self, prefix):
        """The last line whose first word(s) equal prefix, or None."""
        for line in reversed(self.lines()):
            if line == prefix or line.startswith(prefix + " "):
                return line
        return None

    def fields(self, prefix, start=0):
        """For every line starting with prefix: its remaining words."""
        n = len(prefix.split())
        return [line.split()[n:] for line in self.lines(start)
                if line == prefix or line.startswith(prefix + " ")]

    def wait_for(self, pattern, timeout=10.0, start=0, root=True):
        """Poll the status file until a line at index >= start matches the regex
        (re.search); return the re.Match. Fails early if the root is gone, unless
        root=False: lines written by a replica (another PID outside) or by the
        children of a root that is a zombie."""
        regex = re.compile(pattern)

        def match():
            for line in self.lines(start):
                m = regex.search(line)
                if m:
                    return m
            if root and not self.alive():
                self._fail(f"gone while waiting for {pattern!r}")
            return None

        m = procutil.wait_until(match, timeout)
        if not m:
            self._fail(f"no line matching {pattern!r} within {timeout:g} s")
        return m

    def signal_and_wait(self, sig, pattern, timeout=10.0, pid=None):
        """Send sig (to pid, default the root) and wait for a new matching line."""
        start = self.mark()
        procutil.kill(pid or self.pid, sig)
        return self.wait_for(pattern, timeout, start)

    def _fail(self, why):
        tail = "\n".join(self.lines()[-15:])
        try:
            with open(self.log_path, "rb") as f:
                log = f.read()[-2000:].decode(errors="replace")
        except FileNotFoundError:
            log = ""
        raise AssertionError(
            f"{self.name} (pid {self.pid}, state {procutil.state(self.pid)}): {why}\n"
            f"--- status tail:\n{tail}\n--- log tail:\n{log}")

    # -- the processes

    def alive(self):
        """The root PID exists and is not a zombie."""
        return procutil.state(self.pid) not in (None, "Z", "X")

    def signal(self, sig, pid=None):
        procutil.kill(pid or self.pid, sig)

    def descendants(self):
        return procutil.descendants(self.pid)

    def pids(self):
        """The root and all its descendants."""
        return [self.pid, *self.descendants()] if procutil.exists(self.pid) else []

    def threads(self, pid=None):
        return procutil.threads(pid or self.pid)

    def kill(self, timeout=GONE_TIMEOUT):
        """Kill the whole tree by PID and wait for every PID to leave /proc.
        Raises AssertionError naming any PID still present after timeout."""
        left = kill_tree([self.pid], session=self.pid, timeout=timeout)
        self._reaper.join(timeout=1.0)
        if left:
            raise AssertionError(f"{self.name}: still present after SIGKILL: {_describe(left)}")


@pytest.fixture
def spawn(workloads, tmp_path):
    """spawn(name, *args, ready=True, status=True) -> Workload.

    name is a workload name (or a path to any program); args follow the
    status path on its command line. ready=True waits for "ready <pid>".
    status=False sends reports to stdout (then status_path is the log).
    Every workload is killed, tree and all, at teardown."""
    started = []
    workdir = str(tmp_path)

    def start(name, *args, ready=True, status=True):
        path = workloads.get(name, name)
        w = Workload(os.path.basename(name), [path, *map(str, args)], workdir, status=status)
        started.append(w)
        if ready:
            w.ready = w.wait_for(rf"^ready {w.pid}$", READY_TIMEOUT)
        return w

    yield start
    errors = []
    for w in reversed(started):
        try:
            w.kill()
        except AssertionError as e:
            errors.append(str(e))
    if errors:
        pytest.fail("cleanup: " + "; ".join(errors), pytrace=False)


@pytest.fixture
def spawn_python(spawn, tmp_path):
    """spawn_python(name, template) -> Workload: a Python workload written out from
    `template` (its "{python}" becomes this interpreter) and started like any other."""
    import sys

    def start(name, template):
        script = tmp_path / f"{name}.py"
        script.write_text(template.format(python=sys.executable))
        script.chmod(0o755)
        return spawn(str(script))

    return start


class PidRegistry:
    """PIDs a test wants killed at teardown, with their descendants.

    A PID registered while alive is remembered with its start time and only
    killed if the same process still holds it; one registered before it
    exists (an expected restored PID) is killed whatever holds it then."""

    def __init__(self):
        self.entries = {}

    def add(self, *pids):
        for pid in pids:
            self.entries[int(pid)] = procutil.start_time(int(pid))

    def __contains__(self, pid):
        return pid in self.entries

    def targets(self):
        out = []
        for pid, started in self.entries.items():
            now = procutil.start_time(pid)
            if now is not None and (started is None or now == started):
                out.append(pid)
        return out


@pytest.fixture
def cleanup_pids():
    """cleanup_pids.add(*pids): kill these (and their descendants) at teardown."""
    registry = PidRegistry()
    yield registry
    left = kill_tree(registry.targets())
    if left:
        pytest.fail(f"cleanup: still present after SIGKILL: {_describe(left)}", pytrace=False)


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs: a dump or pre-dump that does not fit must fail cleanly."""
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
