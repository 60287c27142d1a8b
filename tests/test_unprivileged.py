"""pycr run by an ordinary user on their own processes: the dump works, and the
restore works where the kernel lets it (CAP_CHECKPOINT_RESTORE) or says in one
line what it lacks. Also: a root restore gives every thread the dumped user."""

import os
import pwd
import shutil
import subprocess
import tempfile
import threading

import pytest

import procutil
from asuser import CAP_CHECKPOINT_RESTORE, pycr_as
from pycrcmd import one_line_error, pycr


@pytest.fixture
def user():
    """(uid, gid) of an unprivileged account: nobody, or one made for the tests."""
    for name in ("nobody", "pycr-test"):
        try:
            pw = pwd.getpwnam(name)
            return pw.pw_uid, pw.pw_gid
        except KeyError:
            pass
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    "pycr-test"], check=True, capture_output=True)
    pw = pwd.getpwnam("pycr-test")
    return pw.pw_uid, pw.pw_gid


@pytest.fixture
def userdir(user):
    """A directory of the user's own, reachable by them (tmp_path is root's, mode 0700)."""
    top = tempfile.mkdtemp(prefix="pycr-user-", dir="/tmp")
    os.chmod(top, 0o711)
    home = os.path.join(top, "home")
    os.mkdir(home, 0o700)
    os.chown(home, *user)
    yield home
    shutil.rmtree(top, ignore_errors=True)


class UserProcess:
    """A workload started as `user`, from a copy of its binary the user can execute."""

    def __init__(self, workloads, name, user, home, *args):
        exe = os.path.join(home, name)
        shutil.copy(workloads[name], exe)
        os.chown(exe, *user)
        self.status = os.path.join(home, f"{name}.status")
        self.proc = subprocess.Popen([exe, self.status, *map(str, args)], user=user[0], group=user[1],
                                     extra_groups=[], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True, cwd=home)
        self.pid = self.proc.pid
        self.wait_line(rf"ready {self.pid}")

    def lines(self):
        try:
            with open(self.status) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    def wait_line(self, line, start=0, timeout=10.0):
        assert procutil.wait_until(lambda: line in self.lines()[start:], timeout), \
            f"{self.proc.args[0]}: no line {line!r} within {timeout} s"

    def count(self):
        return max(int(line.split()[-1]) for line in self.lines() if line.startswith("count "))

    def kill(self):
        if self.proc.poll() is None:
            procutil.kill(self.pid)
        self.proc.wait(timeout=10)
        assert not procutil.wait_gone([self.pid])


def test_user_dumps_own_process_and_restore_names_the_missing_capability(workloads, user, userdir):
    w = UserProcess(workloads, "counter", user, userdir)
    try:
        imgdir = os.path.join(userdir, "img")
        pycr_as(*user, "dump", "-t", w.pid, "-D", imgdir, "-R")
        assert os.path.exists(os.path.join(imgdir, "inventory.img"))
        procutil.assert_running_untraced(w.pid)
        n = w.count()
        w.wait_line(f"count {n + 3}")
    finally:
        w.kill()
    out = pycr_as(*user, "restore", "-D", imgdir, "-d", expect=1)
    assert one_line_error(out) == ("pycr: restoring PIDs needs CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN "
                                   f"in the PID namespace's user namespace (pid {w.pid})")
    assert not procutil.exists(w.pid)
    out = pycr_as(*user, "restore", "-D", imgdir, "-d", "--pidns", expect=1)
    assert one_line_error(out) == "pycr: --pidns: creating a PID namespace needs CAP_SYS_ADMIN"


def test_user_dump_of_a_process_with_seccomp_filters_names_cap_sys_admin(workloads, user, userdir):
    w = UserProcess(workloads, "seccomp", user, userdir)
    try:
        out = pycr_as(*user, "dump", "-t", w.pid, "-D", os.path.join(userdir, "img"), "-R", expect=1)
        assert one_line_error(out) == (f"pycr: pid {w.pid} (seccomp) has seccomp filters: freezing it "
                                       "needs PTRACE_O_SUSPEND_SECCOMP, which needs CAP_SYS_ADMIN")
        procutil.assert_running_untraced(w.pid)
    finally:
        w.kill()


def test_user_with_checkpoint_restore_restores_own_process(workloads, user, userdir, cleanup_pids):
    with open("/proc/sys/kernel/cap_last_cap") as f:
        if int(f.read()) < CAP_CHECKPOINT_RESTORE:
            pytest.skip("this kernel has no CAP_CHECKPOINT_RESTORE")
    w = UserProcess(workloads, "counter", user, userdir)
    imgdir = os.path.join(userdir, "img")
    try:
        pycr_as(*user, "dump", "-t", w.pid, "-D", imgdir, "-R")
        n = w.count()
    finally:
        w.kill()
    cleanup_pids.add(w.pid)
    mark = len(w.lines())
    pycr_as(*user, "restore", "-D", imgdir, "-d", caps=[CAP_CHECKPOINT_RESTORE])
    procutil.assert_running_untraced(w.pid)
    w.wait_line(f"count {n + 3}", start=mark)
    status = procutil.status(w.pid)
    # The user's process again, without the capability its restorer had.
    assert status["Uid"].split() == [str(user[0])] * 4
    assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == int(status["CapAmb"], 16) == 0


def test_root_restore_gives_every_thread_the_dumped_user(workloads, user, userdir, tmp_path, cleanup_pids):
    w = UserProcess(workloads, "threads", user, userdir)
    # Reaped as soon as the dump kills it, as a shell reaps its jobs: the dump waits until its PID is free.
    threading.Thread(target=w.proc.wait, daemon=True).start()
    try:
        pycr("dump", "-t", w.pid, "-D", tmp_path / "img")
    finally:
        w.kill()
    cleanup_pids.add(w.pid)
    pycr("restore", "-D", tmp_path / "img", "-d")
    tids = procutil.threads(w.pid)
    assert len(tids) == 4
    for tid in tids:
        with open(f"/proc/{w.pid}/task/{tid}/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        assert fields["Uid"].split() == [str(user[0])] * 4, f"tid {tid}"
        assert int(fields["CapEff"], 16) == 0, f"tid {tid}"
