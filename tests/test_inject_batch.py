"""Injector.call_batch: many injected syscalls in one ptrace stop.

A program sets handlers of every kind (flags, masks, SIG_IGN, SA_NOCLDWAIT on
SIGCHLD); the batched read of its 64 sigactions must give exactly what one
injected rt_sigaction per signal gives, and a tracer killed in the middle of a
batch must leave the program as it was: counting on, same mask, same handlers.
"""

import os
import re
import signal
import struct
import subprocess
import sys
import time

import pytest

from pycr import proc
from pycr.collect.core import KSIGACTION, collect_sigactions
from pycr.leftovers import trampoline_address, wipe_trampoline
from pycr.ptrace.batch import end_signal
from pycr.ptrace.inject import Injector
from helpers_ptrace import Proc, build, seized

HANDLERS_C = r"""
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
static volatile sig_atomic_t usr1, report;
static volatile long a, b, bad;
static void on_usr1(int s) { (void)s; usr1++; }
static void on_usr2(int s) { (void)s; report = 1; }
static void on_other(int s, siginfo_t *i, void *c) { (void)s; (void)i; (void)c; }
static void set(int sig, void (*h)(int), int flags, int masked) {
    struct sigaction sa; memset(&sa, 0, sizeof sa);
    sa.sa_handler = h; sa.sa_flags = flags;
    if (masked) { sigaddset(&sa.sa_mask, masked); sigaddset(&sa.sa_mask, SIGRTMIN + 3); }
    sigaction(sig, &sa, 0);
}
/* argv[1] "handled": SIGURG, SIGWINCH, SIGCHLD have handlers; "busy": so have SIGPIPE and SIGTERM.
   Prints "ready", then on SIGUSR2 a report. */
int main(int argc, char **argv) {
    struct sigaction sa; memset(&sa, 0, sizeof sa);
    set(SIGUSR1, on_usr1, SA_RESTART, 0);
    set(SIGUSR2, on_usr2, 0, SIGUSR1);
    set(SIGTERM, SIG_IGN, 0, 0);
    set(SIGPIPE, SIG_IGN, 0, SIGHUP);
    set(SIGCHLD, SIG_DFL, SA_NOCLDWAIT | SA_NOCLDSTOP, 0);
    sa.sa_sigaction = on_other; sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER | SA_RESETHAND;
    sigaddset(&sa.sa_mask, SIGINT); sigaction(SIGHUP, &sa, 0); sigaction(SIGRTMIN + 5, &sa, 0);
    if (argc > 1) { set(SIGURG, on_usr1, 0, 0); set(SIGWINCH, on_usr1, 0, 0); set(SIGCHLD, on_usr1, 0, 0); }
    if (argc > 1 && argv[1][0] == 'b') { set(SIGPIPE, on_usr1, 0, 0); set(SIGTERM, on_usr1, 0, 0); }
    sigset_t block; sigemptyset(&block); sigaddset(&block, SIGQUIT); sigprocmask(SIG_BLOCK, &block, 0);
    printf("ready %d\n", getpid()); fflush(stdout);
    for (;;) {
        a++; b += 2; if (b != 2 * a) bad++;
        if (report) { report = 0; printf("usr1=%d a=%ld bad=%ld\n", (int)usr1, a, bad); fflush(stdout); }
    }
}
"""


@pytest.fixture(scope="module")
def handlers_exe(tmp_path_factory):
    return build(str(tmp_path_factory.mktemp("bin")), "handlers", HANDLERS_C)


def _start(exe, *args):
    p = Proc([exe, *args])
    assert p.readline().startswith("ready")
    return p


def _one_by_one(inj):
    """The 64 kernel sigactions read with one injected rt_sigaction each (the reference)."""
    out = []
    with inj.scratch(KSIGACTION.size) as buf:
        for sig in range(1, 65):
            if sig in (signal.SIGKILL, signal.SIGSTOP):
                out.append({"handler": 0, "flags": 0, "restorer": 0, "mask": 0})
                continue
            assert inj.call("rt_sigaction", sig, 0, buf, 8) == 0
            handler, flags, restorer, mask = KSIGACTION.unpack(inj.read(buf, KSIGACTION.size))
            out.append({"handler": handler, "flags": flags, "restorer": restorer, "mask": mask})
    return out


def _status_sig(pid, key):
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith(key + ":")).split()[1], 16)


@pytest.mark.parametrize("variant, ends_with", [("", signal.SIGURG), ("handled", signal.SIGPIPE), ("busy", None)])
def test_batch_reads_what_one_injected_call_each_reads(handlers_exe, variant, ends_with):
    """The batch ends with SIGURG when it is free, else with a signal the program ignores
    (SIGPIPE); with none left, one call each. Always the same 64 actions, the program unchanged."""
    p = _start(handlers_exe, *([variant] if variant else []))
    try:
        with seized(p.pid) as t:
            regs, mask = t.get_regs(), t.get_sigmask()
            assert end_signal(proc.status(p.pid), mask) == ends_with
            with Injector(t) as inj:
                assert (inj.batch_loop() is None) == (ends_with is None)
                batched = collect_sigactions(inj)
                reference = _one_by_one(inj)
            assert t.get_regs() == regs and t.get_sigmask() == mask
        assert batched == reference
        chld, term, hup = (batched[s - 1] for s in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP))
        assert (chld["handler"] == 0 and chld["flags"] & 0x3 == 0x3) == (not variant)   # SA_NOCLDSTOP|SA_NOCLDWAIT
        assert (term["handler"] == 1) == (variant != "busy")                # SIG_IGN
        assert hup["flags"] & 0xC8000004 == 0xC8000004 and hup["mask"] >> (signal.SIGINT - 1) & 1
        assert trampoline_address(p.pid) is None
        p.popen.send_signal(signal.SIGUSR2)
        assert "bad=0" in p.readline()
    finally:
        p.kill()


def test_tracer_killed_mid_batch_leaves_the_task_as_it_was(handlers_exe):
    """A tracer SIGKILLed while the task runs a batch (asleep in its third nanosleep):
    the kernel detaches the task, which runs the rest of the table and rt_sigreturns
    from the recovery frame; it counts on with its mask and handlers as before, and
    takes a signal sent meanwhile."""
    p = _start(handlers_exe)
    try:
        with seized(p.pid) as t, Injector(t) as inj:
            before = collect_sigactions(inj)
        mask = _status_sig(p.pid, "SigBlk")
        assert mask == 1 << (signal.SIGQUIT - 1)
        ready_r, ready_w = os.pipe()
        tracer = os.fork()
        if tracer == 0:         # the tracer: a batch of 10 sleeps of 40 ms and 62 reads; killed in it
            try:
                os.close(ready_r)
                with seized(p.pid) as t:
                    inj = Injector(t)
                    with inj.scratch(64 * KSIGACTION.size + 16) as buf:
                        inj.write(buf, struct.pack("<qq", 0, 40_000_000))
                        calls = [("nanosleep", buf, 0)] * 10
                        calls += [("rt_sigaction", s, 0, buf + 16 + 32 * (s - 1), 8) for s in range(1, 65)
                                  if s not in (signal.SIGKILL, signal.SIGSTOP)]
                        os.write(ready_w, b"x")
                        inj.call_batch(calls)
            finally:
                os._exit(1)                 # not reached in time: the parent fails the test
        os.close(ready_w)
        assert os.read(ready_r, 1) == b"x"
        os.close(ready_r)
        time.sleep(0.1)
        vdso = next(v for v in proc.maps(p.pid) if v.kind == "vdso")
        with open(f"/proc/{p.pid}/syscall") as f:
            fields = f.read().split()
        os.kill(tracer, signal.SIGKILL)
        _, status = os.waitpid(tracer, 0)
        assert os.WIFSIGNALED(status), "the tracer finished its batch before it was killed"
        assert fields[0] == "35" and vdso.start <= int(fields[-1], 16) < vdso.end, fields   # in the loop
        deadline = time.monotonic() + 5
        while proc.status(p.pid).tracer_pid and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)                     # the rest of the batch: 7 more sleeps, then rt_sigreturn
        p.popen.send_signal(signal.SIGUSR1)
        time.sleep(0.05)
        p.popen.send_signal(signal.SIGUSR2)
        report = p.readline()
        assert "usr1=1 " in report and "bad=0" in report, report
        assert _status_sig(p.pid, "SigBlk") == mask
        assert _status_sig(p.pid, "SigPnd") == 0 and _status_sig(p.pid, "ShdPnd") == 0
        assert trampoline_address(p.pid) is not None        # what `pycr cleanup` removes
        assert wipe_trampoline(p.pid) and trampoline_address(p.pid) is None
        with seized(p.pid) as t, Injector(t) as inj:
            assert collect_sigactions(inj) == before
    finally:
        p.kill()


def test_restore_sets_every_handler_again(handlers_exe, tmp_path, cleanup_pids):
    """Dump and restore the program: its handlers (set in one batch in the restored
    task) read back exactly as before, and so do its blocked mask and its ignored set."""
    from pycrcmd import pycr
    p = _start(handlers_exe)
    try:
        with seized(p.pid) as t, Injector(t) as inj:
            before = collect_sigactions(inj)
        masks = {key: _status_sig(p.pid, key) for key in ("SigBlk", "SigIgn", "SigCgt")}
        dump = subprocess.Popen([sys.executable, "-m", "pycr", "dump", "-t", str(p.pid), "-D", tmp_path / "img"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        p.popen.wait(10)            # reaped here: pycr waits until the killed tree's PIDs are free
        assert dump.wait(60) == 0
        cleanup_pids.add(p.pid)
        said = pycr("restore", "-D", tmp_path / "img", "-d", "-vv").stderr
        assert re.search(rf"^pycr: pid {p.pid}: \d+ syscalls in one stop: .* an int3 stops it$", said, re.M), said
        assert {key: _status_sig(p.pid, key) for key in masks} == masks
        with seized(p.pid) as t, Injector(t) as inj:
            assert collect_sigactions(inj) == before
        assert proc.status(p.pid).state in "RS"
    finally:
        p.kill()
