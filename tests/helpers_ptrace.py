"""Workloads for the proc/ptrace/freeze tests: small C programs built with gcc,
started with a clean fd table, and always killed by PID and reaped."""

import os
import select
import signal
import subprocess
import time

import procutil
from pycr.errors import TaskGone
from pycr.ptrace import binding as B
from pycr.ptrace.thread import Thread

COUNTER_C = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
static volatile sig_atomic_t usr1, report;
static volatile long a, b, bad;
static void on_usr1(int s) { (void)s; usr1++; }
static void on_usr2(int s) { (void)s; report = 1; }
static void *worker(void *arg) {
    long i = (long)arg; volatile long k = 0;
    struct timespec ts = {0, 1000000};
    for (;;) { if (i % 2) nanosleep(&ts, 0); else k++; }
    return 0;
}
/* argv[1]: extra threads. Prints "ready", then on SIGUSR2 a report line. */
int main(int argc, char **argv) {
    int extra = argc > 1 ? atoi(argv[1]) : 0;
    struct sigaction sa = {0};
    sa.sa_handler = on_usr1; sigaction(SIGUSR1, &sa, 0);
    sa.sa_handler = on_usr2; sigaction(SIGUSR2, &sa, 0);
    for (long i = 0; i < extra; i++) { pthread_t t; pthread_create(&t, 0, worker, (void *)i); }
    printf("ready %d\n", getpid()); fflush(stdout);
    for (;;) {
        a++; b += 2; if (b != 2 * a) bad++;
        if (report) { report = 0; printf("usr1=%d a=%ld bad=%ld\n", (int)usr1, a, bad); fflush(stdout); }
    }
}
"""

TREE_C = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>
static void *nap(void *x) { (void)x; for (;;) { struct timespec ts = {0, 2000000}; nanosleep(&ts, 0); } }
static void idle(void) { volatile long k = 0; for (;;) { k++; if (!(k & 0xfffff)) usleep(100); } }
/* root -> A -> C, root -> B (4 threads), root -> D : 5 processes, 8 threads. */
int main(void) {
    int p[2]; pipe(p);
    if (fork() == 0) { if (fork() == 0) { write(p[1], "C", 1); idle(); } write(p[1], "A", 1); idle(); }
    if (fork() == 0) { pthread_t t; for (int i = 0; i < 3; i++) pthread_create(&t, 0, nap, 0);
                       write(p[1], "B", 1); idle(); }
    if (fork() == 0) { write(p[1], "D", 1); idle(); }
    char c; for (int i = 0; i < 4; i++) read(p[0], &c, 1);
    usleep(20000);
    printf("ready %d\n", getpid()); fflush(stdout);
    idle();
}
"""

FORKER_C = r"""
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>
/* Forks without pause; each child forks once more and both exit soon. */
int main(void) {
    printf("ready %d\n", getpid()); fflush(stdout);
    for (;;) {
        pid_t c = fork();
        if (c == 0) { if (fork() == 0) { usleep(500); _exit(0); } usleep(1000); while (wait(0) > 0); _exit(0); }
        while (waitpid(-1, 0, WNOHANG) > 0);
        usleep(200);
    }
}
"""


def build(tmp_dir, name, source, extra=()):
    src = os.path.join(tmp_dir, name + ".c")
    exe = os.path.join(tmp_dir, name)
    with open(src, "w") as f:
        f.write(source)
    subprocess.run(["gcc", "-O1", "-pthread", "-o", exe, src, *extra], check=True)
    return exe


class Proc:
    """A started workload; read its report lines; kill() kills by PID and reaps."""

    def __init__(self, argv, new_session=False):
        self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      close_fds=True, start_new_session=new_session)
        self.pid = self.popen.pid
        self.extra_pids = []

    def readline(self, timeout=5.0):
        fd = self.popen.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"pid {self.pid}: no output within {timeout} s")
            chunk = os.read(fd, 1)
            if not chunk:
                raise EOFError(f"pid {self.pid}: output closed")
            buf += chunk
        return buf.decode().strip()

    def report(self, timeout=5.0):
        """Ask a counter workload for its state: dict of usr1, a, bad."""
        os.kill(self.pid, signal.SIGUSR2)
        line = self.readline(timeout)
        return {k: int(v) for k, v in (w.split("=") for w in line.split())}

    def report_until(self, accept, timeout=3.0):
        """Reports until accept(report) holds (a process signal may reach a
        sleeping thread a little after the report); returns the last report."""
        last = []

        def accepted():
            last[:] = [self.report()]
            return accept(last[0])
        procutil.wait_until(accepted, timeout)
        return last[0]

    def kill(self):
        pids = set(self.extra_pids)
        try:
            pids.update(_descendants(self.pid))
        except OSError:
            pass
        for pid in [self.pid, *pids]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.popen.wait(timeout=10)
        self.popen.stdout.close()


def _descendants(pid):
    out, queue = [], [pid]
    while queue:
        cur = queue.pop()
        try:
            for tid in os.listdir(f"/proc/{cur}/task"):
                with open(f"/proc/{cur}/task/{tid}/children") as f:
                    kids = [int(c) for c in f.read().split()]
                out.extend(kids)
                queue.extend(kids)
        except OSError:
            pass
    return out


def state_and_tracer(tid):
    """(State letter, TracerPid) of a thread, or (None, None) once it is gone."""
    try:
        with open(f"/proc/{tid}/status") as f:
            text = f.read()
    except OSError:
        return None, None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return fields["State"].split()[0], int(fields["TracerPid"])


def wait_state(pid, letters, timeout=5.0):
    seen = []

    def reached():
        seen[:] = [state_and_tracer(pid)[0]]
        return seen[0] is not None and seen[0] in letters
    if not procutil.wait_until(reached, timeout, 0.005):
        raise AssertionError(f"pid {pid} not in state {letters}: {state_and_tracer(pid)}")
    return seen[0]


def free_pid():
    for pid in range(32767, 1000, -1):
        if not os.path.exists(f"/proc/{pid}"):
            return pid
    raise RuntimeError("no free pid")


class seized:
    """Seize + interrupt one thread; always detach."""

    def __init__(self, tid, options=B.O_SUSPEND_SECCOMP):
        self.thread = Thread(tid)
        self.options = options

    def __enter__(self):
        t = self.thread
        t.seize(self.options)
        t.interrupt()
        stop = t.wait(5)
        assert stop.is_interrupt_stop, stop
        return t

    def __exit__(self, *exc):
        try:
            self.thread.release()
        except TaskGone:
            pass
