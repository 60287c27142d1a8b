"""An injection that goes wrong leaves the task as it was.

- The caller fails inside `with Injector(...)` after an injected syscall that
  failed: registers, blocked mask, maps and the [vdso] padding are as before.
- The kernel refuses the registers when the Injector puts them back (simulated:
  Thread.set_regs raises once inside Injector.restore): the task is left at the
  recovery frame and, once detached, returns to its exact state by rt_sigreturn:
  it counts on from where it was, with its blocked mask, and only the
  trampoline in [vdso] padding is left (listed by `pycr check -t`).
"""

import errno
import signal

import pytest

import procutil
from helpers_ptrace import seized
from pycrcmd import pycr
from pycr.errors import PycrError
from pycr.ptrace.inject import Injector
from pycr.ptrace.thread import Thread



def vdso(pid):
    start, end = next((s, e) for s, e, _, path in procutil.maps(pid) if path == "[vdso]")
    return procutil.read_memory(pid, start, end - start)


def state(pid):
    return procutil.coalesced_maps(pid), procutil.fds(pid), procutil.status(pid)["SigBlk"]


def blocked_counter(spawn):
    """A counter, counting (the Injector blocks every signal while it injects: SigBlk
    must come back to the counter's own mask)."""
    w = spawn("counter")
    w.wait_for(r"^count \d+$")
    return w


def counts_on(w, where):
    n = int(w.last("count").split()[1])
    w.wait_for(rf"^count {n + 3}$")
    counts = [int(f[0]) for f in w.fields("count")]
    assert counts == list(range(1, len(counts) + 1)), f"{where}: the counter skipped or started over"


def test_caller_failure_inside_the_block_puts_everything_back(spawn):
    w = blocked_counter(spawn)
    before, padding = state(w.pid), vdso(w.pid)
    with seized(w.pid) as t:
        regs, mask = t.get_regs(), t.get_sigmask()
        with pytest.raises(RuntimeError, match="the caller gives up"):
            with Injector(t) as inj:
                assert inj.call("close", 12345) == -errno.EBADF
                assert inj.call("openat", -100, 0, 0, 0) == -errno.EFAULT     # a NULL path
                assert vdso(w.pid) != padding                                 # the trampoline is in
                raise RuntimeError("the caller gives up")
        assert t.get_regs() == regs
        assert t.get_sigmask() == mask
        assert vdso(w.pid) == padding
        assert state(w.pid) == before
    procutil.assert_running_untraced(w.pid)
    counts_on(w, "after a failed block")
    assert state(w.pid) == before
    assert pycr("check", "-t", w.pid).stdout.startswith("nothing of pycr's")


def test_refused_registers_return_through_the_recovery_frame(spawn, monkeypatch):
    w = blocked_counter(spawn)
    before, padding = state(w.pid), vdso(w.pid)
    refused = []
    real_set_regs = Thread.set_regs

    def refuse_once(self, regs):
        if not refused:
            refused.append(regs)
            raise PycrError(f"tid {self.tid}: PTRACE_SETREGS refused (simulated)")
        return real_set_regs(self, regs)

    with seized(w.pid) as t:
        with Injector(t) as inj:
            assert inj.call("getpid") == w.pid
            monkeypatch.setattr(Thread, "set_regs", refuse_once)
        monkeypatch.undo()
        assert refused, "Injector.restore never set the registers"
    # Detached at the trampoline's rt_sigreturn: the task loads its own state from the frame.
    procutil.assert_running_untraced(w.pid)
    counts_on(w, "after the recovery frame")
    assert state(w.pid) == before
    # Its SIGUSR1 handler still runs (mask and stack as they were).
    w.signal_and_wait(signal.SIGUSR1, r"^usr1 \d+$")
    # Only the trampoline is left in the [vdso] padding, and pycr check/cleanup know it.
    listed = pycr("check", "-t", w.pid, expect=3).stdout.splitlines()
    assert [line.split(" at ")[0] for line in listed[:-1]] == [f"pid {w.pid}: pycr's syscall trampoline"]
    pycr("cleanup", "-t", w.pid)
    assert vdso(w.pid) == padding
    counts_on(w, "after cleanup")
