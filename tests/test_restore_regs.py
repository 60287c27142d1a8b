"""A task restored while blocked in a syscall: the kernel's restart rules hold after restore.

The sigread workload blocks in read() on an empty pipe with a SIGUSR1 handler.
It is dumped there and restored; the restored task must be back in that read()
(not returning the kernel-internal -ERESTARTSYS to the program), and a SIGUSR1
sent to the restored task must then do what it does to a task never dumped:
without SA_RESTART the read fails with EINTR, with SA_RESTART it goes on and
returns the data written to the pipe afterwards.
"""

import errno
import os
import signal

import procutil
from pycrcmd import pycr

SYS_READ = 0


def in_syscall(pid, nr, timeout=5.0):
    """Wait until pid sleeps inside syscall nr (/proc/PID/syscall); True if it does."""
    def inside():
        try:
            with open(f"/proc/{pid}/syscall") as f:
                fields = f.read().split()
        except OSError:
            fields = []
        return bool(fields) and fields[0] == str(nr) and procutil.state(pid) == "S"
    return procutil.wait_until(inside, timeout)


def dump_and_restore_in_read(spawn, tmp_path, cleanup_pids, mode):
    w = spawn("sigread", mode)
    rfd, wfd = (int(x) for x in w.wait_for(r"^pipe (\d+) (\d+)$").groups())
    w.wait_for(r"^reading 1$")
    assert in_syscall(w.pid, SYS_READ)
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img")
    assert procutil.wait_gone([w.pid]) == []
    cleanup_pids.add(w.pid)
    mark = w.mark()
    pycr("restore", "-D", tmp_path / "img", "-d")
    # Back inside the same read(), and nothing reported: it neither returned nor failed.
    assert in_syscall(w.pid, SYS_READ), open(f"/proc/{w.pid}/syscall").read()
    assert w.lines(mark) == []
    return w, mark, wfd


def write_to_pipe(pid, fd, data):
    writer = os.open(f"/proc/{pid}/fd/{fd}", os.O_WRONLY | os.O_CLOEXEC)
    try:
        assert os.write(writer, data) == len(data)
    finally:
        os.close(writer)


def test_signal_without_sa_restart_interrupts_the_restored_read(spawn, tmp_path, cleanup_pids):
    w, mark, wfd = dump_and_restore_in_read(spawn, tmp_path, cleanup_pids, "norestart")
    w.signal(signal.SIGUSR1)
    w.wait_for(rf"^read error {errno.EINTR}$", start=mark)
    assert w.lines(mark)[:3] == ["usr1", f"read error {errno.EINTR}", "reading 2"]
    # and the next read works on the same pipe
    write_to_pipe(w.pid, wfd, b"after")
    w.wait_for(rf"^read 5 {b'after'.hex()}$", start=mark)


def test_signal_with_sa_restart_lets_the_restored_read_go_on(spawn, tmp_path, cleanup_pids):
    w, mark, wfd = dump_and_restore_in_read(spawn, tmp_path, cleanup_pids, "restart")
    w.signal_and_wait(signal.SIGUSR1, r"^usr1$")
    # The read was restarted: blocked in it again, no error, and it returns what comes next.
    assert in_syscall(w.pid, SYS_READ)
    write_to_pipe(w.pid, wfd, b"hello")
    w.wait_for(rf"^read 5 {b'hello'.hex()}$", start=mark)
    assert w.lines(mark)[:2] == ["usr1", f"read 5 {b'hello'.hex()}"]
