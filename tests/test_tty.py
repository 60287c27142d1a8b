"""Pseudo-terminals held inside the tree, and a shell job's terminal (-j).

Every terminal here is a pty the test makes itself (never the runner's). The
test talks to a shell on the slave through its own copy of the tree's master
(pidfd_getfd), so it can read the shell's answers before the dump (a terminal
holding queued bytes is refused) and again after the restore.
"""

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest

import procutil
from pycrcmd import one_line_error, pycr

from pycr.native import core

#: A session on a pty: the root holds the master and sleeps; its child (pty.fork: setsid +
#: TIOCSCTTY) is a shell that runs each line it reads.
SHELL_ON_PTY = """#!{python}
import os, pty, sys, time
st = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
pid, master = pty.fork()
if pid == 0:
    os.execvp(sys.argv[2:3] and "setpriv" or "sh", sys.argv[2:] + ["sh", "-c", 'while IFS= read -r line; do eval "$line"; done'])
os.write(st, ("master %d child %d\\n" % (master, pid)).encode())
os.write(st, ("ready %d\\n" % os.getpid()).encode())
while True:
    time.sleep(1)
"""

WINSIZE = struct.Struct("HHHH")


class Terminal:
    """The test's end of a pty master: run a shell line, read its answer."""

    def __init__(self, fd):
        self.fd = fd

    def read_until(self, pattern, timeout=10.0):
        out, deadline = b"", time.monotonic() + timeout
        while not re.search(pattern, out.decode(errors="replace")):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise AssertionError(f"no {pattern!r} from the terminal within {timeout} s; got {out!r}")
            out += os.read(self.fd, 4096)
        return out.decode(errors="replace")

    def run(self, line, timeout=10.0):
        """The output of one shell line (the echo of the line itself left out)."""
        os.write(self.fd, (line + "; echo END$((40+2))\n").encode())
        text = self.read_until(r"END42\r?\n", timeout)
        body = text[:text.rindex("END42")]
        return body.split("END$((40+2))", 1)[-1].replace("\r\n", "\n").strip()

    def drain(self, quiet=0.2):
        """Read until the terminal has been quiet for `quiet` s (nothing queued at the dump)."""
        while select.select([self.fd], [], [], quiet)[0]:
            os.read(self.fd, 4096)

    def close(self):
        os.close(self.fd)


def tree_terminal(pid, fd):
    return Terminal(core.dup_from(pid, fd))


def facts(term):
    return {"tty": term.run("tty"), "size": term.run("stty size"), "modes": term.run("stty -g"),
            "answer": term.run("echo hello-$((6*7))")}


def start_shell(spawn_python, spawn=None, tmp_path=None, prefix=()):
    """prefix: setpriv options the shell runs under (with spawn and tmp_path)."""
    if prefix:
        w = spawn(_script(tmp_path, "shell-on-pty", SHELL_ON_PTY), *prefix)
    else:
        w = spawn_python("shell-on-pty", SHELL_ON_PTY)
    m = w.wait_for(r"^master (\d+) child (\d+)$")
    return w, int(m.group(1)), int(m.group(2))


def test_a_shell_on_a_pty_comes_back_on_the_same_pts(spawn_python, tmp_path, cleanup_pids):
    w, master_fd, child = start_shell(spawn_python)
    term = tree_terminal(w.pid, master_fd)
    try:
        fcntl.ioctl(term.fd, termios.TIOCSWINSZ, WINSIZE.pack(37, 101, 0, 0))
        term.run("stty -echoctl intr ^B")          # settings of the slave that the restore must keep
        before = facts(term)
        term.drain()
    finally:
        term.close()
    assert before["tty"].startswith("/dev/pts/") and before["size"] == "37 101"
    assert before["answer"] == "hello-42"
    pts = before["tty"]
    assert procutil.tty_dev(child) == os.stat(pts).st_rdev

    pycr("dump", "-t", w.pid, "-D", tmp_path / "img")
    assert not procutil.wait_gone([w.pid, child])
    assert not os.path.exists(pts)
    pycr("restore", "-D", tmp_path / "img", "-d")
    cleanup_pids.add(w.pid, child)

    term = tree_terminal(w.pid, master_fd)
    try:
        after = facts(term)
    finally:
        term.close()
    assert after == before
    # The shell leads its session again, with the pty as controlling terminal and its group in front.
    assert procutil.sid(child) == child
    assert procutil.tty_dev(child) == os.stat(pts).st_rdev
    assert procutil.stat(child)["tpgid"] == procutil.pgid(child)


#: A pty pair in packet mode with the slave exclusive, a second master left locked (its slave
#: never opened); on SIGUSR1 it reports what the kernel says of each.
PTY_MODES = """#!{python}
import fcntl, os, select, signal, struct, sys, termios, time
st = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
def report(line):
    os.write(st, (line + "\\n").encode())
def get(fd, req):
    return struct.unpack("i", fcntl.ioctl(fd, req, b"\\0" * 4))[0]
TIOCGPTN, TIOCGPKT, TIOCGPTLCK, TIOCGEXCL = 0x80045430, 0x80045438, 0x80045439, 0x80045440
master, slave = os.openpty()
fcntl.ioctl(master, termios.TIOCPKT, struct.pack("i", 1))
fcntl.ioctl(slave, termios.TIOCEXCL)
fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 200, 0, 0))
locked = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY)
if sys.argv[2:] == ["queued"]:
    os.write(slave, b"unread\\n")
def facts():
    size = struct.unpack("HHHH", fcntl.ioctl(slave, termios.TIOCGWINSZ, b"\\0" * 8))[:2]
    return ("pts %s index %d locked-index %d packet %d excl %d lock %d size %s" % (os.ttyname(slave),
            get(master, TIOCGPTN), get(locked, TIOCGPTN), get(master, TIOCGPKT), get(slave, TIOCGEXCL),
            get(locked, TIOCGPTLCK), size))
asked = []
signal.signal(signal.SIGUSR1, lambda *a: asked.append(1))
report("fds %d %d %d" % (master, slave, locked))
report("facts " + facts())
report("ready %d" % os.getpid())
while True:
    while not asked:
        time.sleep(0.01)
    asked.clear()
    os.write(slave, b"ping\\n")
    select.select([master], [], [], 5)
    data = os.read(master, 100)          # packet mode: a TIOCPKT_DATA (0) byte first
    report("facts " + facts() + " read %r" % data)
"""


def test_packet_mode_exclusive_lock_and_window_size_come_back(spawn_python, tmp_path, cleanup_pids):
    w = spawn_python("pty-modes", PTY_MODES)
    before = w.wait_for(r"^facts (.*)$").group(1)
    assert "packet 1 excl 1 lock 1 size (24, 200)" in before
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img")
    pycr("restore", "-D", tmp_path / "img", "-d")
    cleanup_pids.add(w.pid)
    after = w.signal_and_wait(signal.SIGUSR1, r"^facts (.*) read (.*)$")
    assert after.group(1) == before
    assert after.group(2) == repr(b"\0ping\r\n")


def test_a_pty_whose_index_is_taken_is_refused_by_name(spawn_python, tmp_path):
    w = spawn_python("pty-modes", PTY_MODES)
    pts = re.search(r"pts (\S+)", w.wait_for(r"^facts (.*)$").group(1)).group(1)
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img")
    assert not procutil.wait_gone([w.pid])
    # Take that index: devpts hands out the lowest free one, so hold the lower ones meanwhile.
    index, held, mine = int(pts.rsplit("/", 1)[1]), [], None
    try:
        while mine is None:
            fd = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY)
            got = struct.unpack("i", fcntl.ioctl(fd, 0x80045430, b"\0" * 4))[0]
            if got == index:
                mine = fd
            else:
                assert got < index, f"index {index} was taken by someone else"
                held.append(fd)
        for fd in held:
            os.close(fd)
        held = []
        proc = pycr("restore", "-D", tmp_path / "img", "-d", expect=1)
        assert one_line_error(proc) == f"pycr: {pts} is in use: the restored pty needs that name back " \
                                       "(programs keep it)"
        assert not procutil.exists(w.pid)
    finally:
        for fd in held + ([mine] if mine is not None else []):
            os.close(fd)


def test_bytes_queued_in_a_pty_are_refused_by_name(spawn, tmp_path):
    script = tmp_path / "queued.py"
    script.write_text(PTY_MODES.format(python=sys.executable))
    script.chmod(0o755)
    w = spawn(str(script), "queued")
    master = int(w.wait_for(r"^fds (\d+) ").group(1))
    pts = re.search(r"pts (\S+)", w.wait_for(r"^facts (.*)$").group(1)).group(1)
    proc = pycr("dump", "-t", w.pid, "-D", tmp_path / "img", expect=1)
    assert one_line_error(proc) == (f"pycr: pid {w.pid} fd {master}: {pts} holds 8 queued bytes on its master "
                                    "side, which pycr cannot copy without consuming them: dump when it is drained")
    procutil.assert_running_untraced(w.pid)
    assert not os.path.exists(tmp_path / "img")
    # Still there for the program: its next read gets them.
    got = w.signal_and_wait(signal.SIGUSR1, r"read (.*)$").group(1)
    assert got.startswith(repr(b"\0unread\r\n")[:-1])      # "ping" may follow in the same read


#: A job-control shell in miniature: it leads a session on the pty of its stdin, runs its
#: command as a job in a process group of its own, in the foreground, and waits for it.
MINI_SHELL = """#!{python}
import fcntl, os, signal, sys, termios, time
st = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
def report(line):
    os.write(st, (line + "\\n").encode())
os.setsid()
fcntl.ioctl(0, termios.TIOCSCTTY, 0)
signal.signal(signal.SIGTTOU, signal.SIG_IGN)
pid = os.fork()
if pid == 0:
    os.setpgid(0, 0)
    signal.signal(signal.SIGTTOU, signal.SIG_DFL)
    os.execv(sys.argv[2], sys.argv[2:])
os.setpgid(pid, pid)
os.tcsetpgrp(0, pid)
report("job %d" % pid)
_, status = os.waitpid(pid, 0)
os.tcsetpgrp(0, os.getpgrp())
report("done %d" % status)
while True:
    time.sleep(1)
"""

TICKER = """#!{python}
import os, time
n = 0
while True:
    n += 1
    os.write(1, b"tick %d\\n" % n)
    time.sleep(0.05)
"""


def _script(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text.format(python=sys.executable))
    path.chmod(0o755)
    return str(path)


def _on_new_pty(argv, status, cleanup_pids):
    """Start argv with a new pty as stdin, stdout and stderr -> (its master, Popen)."""
    master, slave = os.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    cleanup_pids.add(proc.pid)
    return Terminal(master), proc


def _wait_line(path, pattern, timeout=10.0):
    def found():
        text = open(path).read() if os.path.exists(path) else ""
        return re.search(pattern, text, re.M)
    m = procutil.wait_until(found, timeout)
    assert m, f"no {pattern!r} in {path} within {timeout} s"
    return m


def _ticks(term, after=0, timeout=10.0):
    """The last tick number the terminal shows once one beyond `after` came."""
    text = term.read_until(r"tick (\d+)\r\n(?![\s\S]*tick)", timeout) if not after else ""
    while True:
        numbers = [int(n) for n in re.findall(r"tick (\d+)\r\n", text)]
        if numbers and numbers[-1] > after:
            return numbers[-1]
        text += term.read_until(r"tick \d+\r\n", timeout)


def test_a_shell_job_is_refused_without_j_and_moves_to_pycrs_terminal_with_it(tmp_path, cleanup_pids):
    shell, ticker = _script(tmp_path, "mini-shell", MINI_SHELL), _script(tmp_path, "ticker", TICKER)
    term_a, shell_a = _on_new_pty([shell, tmp_path / "a.status", ticker], tmp_path, cleanup_pids)
    try:
        job = int(_wait_line(tmp_path / "a.status", r"^job (\d+)$").group(1))
        cleanup_pids.add(job)
        first = _ticks(term_a)
        old_pts = os.readlink(f"/proc/{job}/fd/1")

        proc = pycr("dump", "-t", job, "-D", tmp_path / "img", expect=1)
        assert one_line_error(proc) == (f"pycr: pid {job} (ticker) runs in session {shell_a.pid} (mini-shell) "
                                        f"outside the tree, on {old_pts}: a shell job; dump it with -j (--shell-job)")
        procutil.assert_running_untraced(job)

        pycr("dump", "-j", "-t", job, "-D", tmp_path / "img")
        assert not procutil.wait_gone([job])
        last = _ticks(term_a, first)
    except BaseException:
        term_a.close()
        raise

    proc = pycr("restore", "-D", tmp_path / "img", "-d", expect=1)
    assert one_line_error(proc) == ("pycr: pid {job} fd 0 ran on the terminal of a shell job (dumped with -j): "
                                    "restore with -j (--shell-job) to put it on pycr's terminal").format(job=job)

    # pycr restore -j, in the foreground, run as a job by a shell on another pty.
    term_b, shell_b = _on_new_pty([shell, tmp_path / "b.status", sys.executable, "-m", "pycr", "restore", "-j",
                                   "-D", tmp_path / "img"], tmp_path, cleanup_pids)
    try:
        _ticks(term_b, last)                       # the count goes on, on the new terminal
        new_pts = os.readlink(f"/proc/{job}/fd/1")
        assert new_pts != old_pts and new_pts.startswith("/dev/pts/")
        assert {os.readlink(f"/proc/{job}/fd/{fd}") for fd in (0, 1, 2)} == {new_pts}
        assert procutil.tty_dev(job) == os.stat(new_pts).st_rdev
        assert procutil.sid(job) == shell_b.pid
        assert procutil.pgid(job) == job and procutil.stat(job)["tpgid"] == job      # in the foreground
        procutil.kill(job)
        status = int(_wait_line(tmp_path / "b.status", r"^done (\d+)$").group(1))
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 128 + signal.SIGKILL  # pycr gave the job's end
    finally:
        procutil.kill(job)
        term_a.close()
        term_b.close()


def test_pycr_migrate_moves_a_shell_job_to_its_terminal(tmp_path, cleanup_pids):
    shell, ticker = _script(tmp_path, "mini-shell", MINI_SHELL), _script(tmp_path, "ticker", TICKER)
    term_a, _shell_a = _on_new_pty([shell, tmp_path / "a.status", ticker], tmp_path, cleanup_pids)
    term_b = None
    try:
        job = int(_wait_line(tmp_path / "a.status", r"^job (\d+)$").group(1))
        cleanup_pids.add(job)
        first = _ticks(term_a)
        term_b, _shell_b = _on_new_pty([shell, tmp_path / "b.status", sys.executable, "-m", "pycr", "migrate",
                                        "-j", "-t", str(job), "--max-passes", "2", "--work-dir",
                                        str(tmp_path / "work")], tmp_path, cleanup_pids)
        text = term_b.read_until(r"namespace init (\d+)\)", timeout=60)
        m = re.search(r"\(pid (\d+) outside its namespace, namespace init (\d+)\)", text)
        root, init = int(m.group(1)), int(m.group(2))
        cleanup_pids.add(init, root)
        assert not procutil.wait_gone([job])              # the source is gone, the replica counts on
        _ticks(term_b, first)
        new_pts = os.readlink(f"/proc/{root}/fd/1")
        assert new_pts.startswith("/dev/pts/") and new_pts != os.readlink(f"/proc/{_shell_a.pid}/fd/1")
        assert procutil.tty_dev(root) == os.stat(new_pts).st_rdev
        assert procutil.sid(root) == _shell_b.pid
    finally:
        term_a.close()
        if term_b is not None:
            term_b.close()


def _shell_with_member(spawn_python, tmp_path, spawn=None, prefix=()):
    """The shell on its pty with settings of its own and a member of its session (a background
    sleep, alive at every pass) -> (workload, master fd, shell pid, member pid, facts)."""
    w, master_fd, child = start_shell(spawn_python, spawn, tmp_path, prefix)
    term = tree_terminal(w.pid, master_fd)
    try:
        fcntl.ioctl(term.fd, termios.TIOCSWINSZ, WINSIZE.pack(37, 101, 0, 0))
        term.run("stty -echoctl intr ^B")
        member = int(term.run("sleep 1000 & echo $!"))
        before = facts(term)
        term.drain()
    finally:
        term.close()
    assert procutil.sid(member) == child and procutil.tty_dev(member) == os.stat(before["tty"]).st_rdev
    return w, master_fd, child, member, before


def _registering(cleanup_pids, fail_at_final=False):
    def hook(rep, replica):
        cleanup_pids.add(*replica.reals)
        if fail_at_final and rep.kind == "dump":
            raise RuntimeError("the migration fails after the replica took the terminal")
    return hook


def test_pycr_migrate_hands_a_pty_and_its_session_to_the_replica(spawn_python, tmp_path, cleanup_pids):
    from pycr.migrate import migrate
    from pycr.migrate.loop import Policy
    w, master_fd, child, member, before = _shell_with_member(spawn_python, tmp_path)
    pts = before["tty"]
    res = migrate(w.pid, policy=Policy(max_passes=3, min_delta=0), on_pass=_registering(cleanup_pids))
    assert not procutil.wait_gone([w.pid, child, member])
    assert res.reports[-1].recreated >= 1              # the member was forked again under its leader
    tasks = res.replica.tasks
    root, shell, sleeper = tasks[w.pid].real, tasks[child].real, tasks[member].real
    # Same pty (the source's own, never reopened): same name, size and modes; the shell answers on it.
    term = tree_terminal(root, master_fd)
    try:
        assert facts(term) == before
    finally:
        term.close()
    rdev = os.stat(pts).st_rdev
    assert procutil.sid(shell) == shell and procutil.tty_dev(shell) == rdev
    assert procutil.stat(shell)["tpgid"] == procutil.pgid(shell)           # its group in front
    # The member has the terminal as its controlling one too: it was forked after the leader took it.
    assert procutil.sid(sleeper) == shell and procutil.tty_dev(sleeper) == rdev
    assert procutil.ppid(sleeper) == shell
    # The killed source's leader sent no SIGHUP to the replica's foreground group: all alive.
    time.sleep(0.3)
    procutil.assert_running_untraced(root, shell)
    assert procutil.state(sleeper) == "S"


def _stopped_migrate(w, tmp_path, step):
    """pycr migrate (CLI) held at `step`, then SIGINT: it fails there -> its stderr."""
    env = dict(os.environ, PYCR_STOP_AT_STEP=step)
    p = subprocess.Popen([sys.executable, "-m", "pycr", "migrate", "-t", str(w.pid), "--max-passes", "2",
                          "--work-dir", str(tmp_path / "work")], env=env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        first = p.stderr.readline()
        assert first.startswith("pycr: stopped at step "), first + p.stderr.read()
        p.send_signal(signal.SIGINT)
        rest = p.stderr.read()
    finally:
        if p.wait(timeout=60) is None:
            p.kill()
    assert p.returncode != 0, rest
    return rest


@pytest.mark.parametrize("when", ["before-resume", "after-resume", "leader-without-CAP_SYS_ADMIN"])
def test_a_migration_failing_after_the_steal_gives_the_terminal_back(spawn_python, spawn, tmp_path, cleanup_pids,
                                                                    when):
    """Without CAP_SYS_ADMIN the source's leader cannot steal it back: the replica's leader lets go first."""
    from pycr.migrate import migrate
    from pycr.migrate.loop import Policy
    prefix = ("--inh-caps=-sys_admin", "--bounding-set=-sys_admin") if "CAP" in when else ()
    w, master_fd, child, member, before = _shell_with_member(spawn_python, tmp_path, spawn, prefix)
    if prefix:
        assert not int(procutil.status(child)["CapEff"], 16) & (1 << 21)
    pts = before["tty"]
    if when != "after-resume":
        _stopped_migrate(w, tmp_path, "release the restored tree")        # after the steal, before the resume
    else:
        with pytest.raises(RuntimeError):
            migrate(w.pid, policy=Policy(max_passes=2, min_delta=0),
                    on_pass=_registering(cleanup_pids, fail_at_final=True))
    procutil.assert_running_untraced(w.pid, child)
    rdev = os.stat(pts).st_rdev
    # The leader has its terminal back, with its group in front, and the shell still answers on it.
    assert procutil.tty_dev(child) == rdev
    assert procutil.stat(child)["tpgid"] == procutil.pgid(child)
    term = tree_terminal(w.pid, master_fd)
    try:
        assert term.run("echo still-$((6*7))") == "still-42"
        assert term.run("tty") == pts
        assert term.run("stty size") == "37 101"
    finally:
        term.close()
    # The member runs on, in its session, but the kernel took its controlling terminal for good
    # (only a session leader or a fork gets one): what a failed migration cannot give back.
    assert procutil.state(member) == "S" and procutil.sid(member) == child
    assert procutil.tty_dev(member) == 0
