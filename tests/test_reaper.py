"""scripts/reaper.py, which CI runs pytest under: the orphans of its command's tree become its
children and are reaped as they die; it exits as its command does."""

import os
import signal
import subprocess
import sys

import procutil

REAPER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "reaper.py")


def test_orphans_become_the_reapers_children_and_are_reaped_as_they_die():
    # The shell starts a sleeper and exits: the sleeper is orphaned while the reaper still waits
    # on the command (the second shell), so it must come to the reaper, not to init.
    cmd = "sh -c 'sleep 30 & echo $!' ; read line"
    reaper = subprocess.Popen([sys.executable, REAPER, "sh", "-c", cmd], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        orphan = int(reaper.stdout.readline())
        assert procutil.wait_until(lambda: procutil.ppid(orphan) == reaper.pid), procutil.ppid(orphan)
        procutil.kill(orphan)
        # gone from /proc: reaped by the reaper (a zombie child of a running parent otherwise stays)
        assert not procutil.wait_gone([orphan], timeout=5)
        reaper.stdin.write("done\n")
        reaper.stdin.close()
        assert reaper.wait(timeout=10) == 0
    finally:
        if reaper.poll() is None:
            reaper.kill()
            reaper.wait()


def test_exit_status_and_sigterm_are_the_commands():
    assert subprocess.run([sys.executable, REAPER, "sh", "-c", "exit 7"]).returncode == 7
    assert subprocess.run([sys.executable, REAPER, "sh", "-c", "kill -TERM $$"]).returncode == 128 + signal.SIGTERM
    # SIGTERM to the reaper is passed on to the command
    p = subprocess.Popen([sys.executable, REAPER, "sh", "-c", "echo up; exec sleep 30"], stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline() == "up\n"
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=10) == 128 + signal.SIGTERM
    p.stdout.close()
