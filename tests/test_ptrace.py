"""Thread and Injector against real targets: stops, registers, xstate, syscalls."""

import os
import signal

import pytest

import procutil
from pycr import proc
from pycr.errors import TaskGone
from pycr.ptrace import binding as B
from pycr.ptrace.inject import Injector
from pycr.ptrace.thread import Thread
from pycr.ptrace.xstate import local_layout
from helpers_ptrace import COUNTER_C, Proc, build, seized, state_and_tracer, free_pid


@pytest.fixture(scope="module")
def counter_exe(tmp_path_factory):
    return build(str(tmp_path_factory.mktemp("bin")), "counter", COUNTER_C)


@pytest.fixture
def counter(counter_exe):
    p = Proc([counter_exe, "3"])
    try:
        assert p.readline().startswith("ready")
        yield p
    finally:
        p.kill()



def test_seize_regs_roundtrip_and_target_keeps_counting(counter):
    before = counter.report()
    for _ in range(20):
        with seized(counter.pid) as t:
            state, tracer = state_and_tracer(counter.pid)
            assert state == "t" and tracer == os.getpid()
            regs = t.get_regs()
            assert regs.rip != 0 and regs.rsp != 0
            t.set_regs(regs)
            t.set_regs(regs.to_dict())
            assert t.get_regs() == regs
            xs = t.get_xstate()
            # The whole area, as CPUID leaf 0xD sizes it for the kernel's XCR0.
            assert len(xs) == local_layout().size
            assert int.from_bytes(xs[464:472], "little") == local_layout().xcr0
            t.set_xstate(xs)
            assert t.get_xstate() == xs
            # A changed area goes in and comes out whole: xmm15 (legacy area, bytes 400..415).
            changed = bytearray(xs)
            changed[400:416] = bytes(range(1, 17))
            changed[512] |= 0x2                     # xstate_bv: the SSE component is in use
            t.set_xstate(bytes(changed))
            got = t.get_xstate()
            assert len(got) == len(xs) and got[400:416] == bytes(range(1, 17))
            t.set_xstate(xs)
            assert t.get_xstate() == xs
    assert state_and_tracer(counter.pid)[1] == 0
    after = counter.report_until(lambda r: r["a"] > before["a"])      # it runs on
    assert after["a"] > before["a"] and after["bad"] == 0


def test_sigmask_rseq_siginfo_seccomp(counter_exe):
    counter = Proc([counter_exe])       # one thread: a process signal can only go to it
    try:
        counter.readline()
        _sigmask_rseq_siginfo_seccomp(counter)
    finally:
        counter.kill()


def _sigmask_rseq_siginfo_seccomp(counter):
    with seized(counter.pid) as t:
        mask = t.get_sigmask()
        t.set_sigmask(mask | (1 << (signal.SIGUSR1 - 1)))
        assert t.get_sigmask() == mask | (1 << (signal.SIGUSR1 - 1))
        os.kill(counter.pid, signal.SIGUSR1)
        assert procutil.wait_until(lambda: signal.SIGUSR1 in procutil.pending_signals(counter.pid))
        shared = t.peek_siginfo(shared=True)
        assert len(shared) == 1 and len(shared[0]) == 128
        assert int.from_bytes(shared[0][:4], "little") == signal.SIGUSR1
        assert t.peek_siginfo(shared=False) == []
        t.set_sigmask(mask)
        ptr, size, sig = t.rseq_config()
        assert ptr != 0 and size >= 32 and sig == 0x53053053
        assert t.seccomp_filters() == []
    # the signal that waited while blocked is delivered after release
    assert counter.report()["usr1"] == 1


def test_wait_reports_exit(counter_exe):
    p = Proc([counter_exe])
    try:
        p.readline()
        t = Thread(p.pid)
        t.seize()
        os.kill(p.pid, signal.SIGKILL)
        stop = t.wait(5)
        assert stop.killed and stop.signal == signal.SIGKILL
    finally:
        p.kill()


def test_bad_pid():
    with pytest.raises(TaskGone):
        Thread(free_pid()).seize()


def test_inject_getpid_gettid_and_state_kept(counter):
    tids = proc.tasks(counter.pid)
    assert len(tids) == 4
    for tid in (tids[0], tids[1], tids[2]):
        with seized(tid) as t:
            regs, xs, mask = t.get_regs(), t.get_xstate(), t.get_sigmask()
            with Injector(t) as inj:
                assert inj.call("getpid") == counter.pid
                assert inj.call("gettid") == tid
                assert inj.call("close", 12345) == -9        # -EBADF
                assert t.get_sigmask() & (1 << (signal.SIGUSR1 - 1))
            assert t.get_regs() == regs
            assert t.get_xstate() == xs
            assert t.get_sigmask() == mask
    first = counter.report()
    after = counter.report_until(lambda r: r["a"] > first["a"])       # it runs on, consistently
    assert after["a"] > first["a"] and after["bad"] == 0


def _peek(pid, addr, n):
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        return os.pread(fd, n, addr)
    finally:
        os.close(fd)


def _scratch_round_trip(counter, inj, size):
    with inj.scratch(size) as addr:
        vma = [v for v in proc.maps(counter.pid) if v.start <= addr < v.end]
        assert vma and vma[0].end >= addr + size and vma[0].write and not vma[0].shared
        inj.write(addr + 100, b"hello pycr")
        assert inj.read(addr + 100, 10) == b"hello pycr"
        # the target itself sees it: write(1, addr+100, 11) lands in our pipe
        inj.write(addr + 110, b"\n")
        assert inj.call("write", 1, addr + 100, 11) == 11
        assert counter.readline() == "hello pycr"
    return addr


def test_inject_scratch_below_the_frame_maps_nothing(counter):
    """Small scratch areas come from the stack below the recovery frame: the
    task's maps and the stack bytes are the same afterwards."""
    with seized(counter.pid) as t:
        regs = t.get_regs()
        maps_before = proc.maps(counter.pid)
        below = t.get_regs().rsp - 32 * 1024
        stack_before = _peek(counter.pid, below, 32 * 1024)
        with Injector(t) as inj:
            _scratch_round_trip(counter, inj, 8192)
            assert _peek(counter.pid, below, 32 * 1024) != stack_before
        assert proc.maps(counter.pid) == maps_before
        assert _peek(counter.pid, below, 32 * 1024) == stack_before
        assert t.get_regs() == regs
    assert counter.report()["bad"] == 0


def test_inject_scratch_larger_than_the_stack_room_is_mapped_and_unmapped(counter):
    with seized(counter.pid) as t:
        regs = t.get_regs()
        with Injector(t) as inj:
            addr = _scratch_round_trip(counter, inj, 1 << 20)
            assert not [v for v in proc.maps(counter.pid) if v.start <= addr < v.end]
        assert t.get_regs() == regs
    assert counter.report()["bad"] == 0


def test_signal_during_injection_is_kept(counter):
    with seized(counter.pid) as t:
        with Injector(t) as inj:
            os.kill(counter.pid, signal.SIGUSR1)
            for _ in range(50):
                assert inj.call("getppid") == os.getpid()
    assert counter.report_until(lambda r: r["usr1"] >= 1)["usr1"] == 1


def test_inject_through_given_trampoline(counter):
    """Method A: a `syscall; int3` the caller placed, run with CONT."""
    with seized(counter.pid) as t:
        regs, xs = t.get_regs(), t.get_xstate()
        with Injector(t) as vdso_inj:
            code = vdso_inj.check("mmap", 0, 4096, 1 | 4, 0x22, -1, 0)   # r-x, private anon
            vdso_inj.write(code, b"\x0f\x05\xcc")                       # FOLL_FORCE write
            with Injector(t, trampoline=code) as inj:
                assert inj.call("getpid") == counter.pid
                assert inj.call("gettid") == counter.pid
            vdso_inj.check("munmap", code, 4096)
        assert t.get_regs() == regs and t.get_xstate() == xs
    assert counter.report()["bad"] == 0


def test_tracer_gone_mid_injection_leaves_the_task_as_it_was(counter):
    """What the kernel does when pycr dies mid-injection, done on purpose: the thread
    is detached at the syscall-exit stop of an injected call, with its signal taken
    from a signal-delivery stop still held by pycr. The task runs rt_sigreturn from
    its recovery frame: registers, mask and extended state as before, the held
    SIGUSR1 delivered, nothing of pycr left but the trampoline bytes."""
    from pycr.leftovers import trampoline_address, wipe_trampoline
    from pycr.ptrace.thread import _tgkill
    t = Thread(counter.pid)
    t.seize(B.O_SUSPEND_SECCOMP)
    try:
        _tgkill(counter.pid, counter.pid, signal.SIGUSR1)     # to the seized thread itself
        stop = t.wait(5)
        assert stop.is_signal_delivery and stop.signal == signal.SIGUSR1, stop
        t.hold_signal(stop)
        mask = t.get_sigmask()
        inj = Injector(t)
        assert inj.call("getpid") == counter.pid
        assert inj.call("getppid") == os.getpid()
        assert t.get_sigmask() | 1 << (signal.SIGKILL - 1) | 1 << (signal.SIGSTOP - 1) == (1 << 64) - 1
    finally:
        t.detach(0)          # as the kernel detaches a dead tracer's tracees
    assert counter.report_until(lambda r: r["usr1"] >= 1)["usr1"] == 1
    assert counter.report()["bad"] == 0
    status = proc.status(counter.pid)
    assert status.tracer_pid == 0
    with open(f"/proc/{counter.pid}/status") as f:
        blocked = int(next(line for line in f if line.startswith("SigBlk:")).split()[1], 16)
    assert blocked == mask
    assert trampoline_address(counter.pid) is not None     # what `pycr cleanup` removes
    assert wipe_trampoline(counter.pid) and trampoline_address(counter.pid) is None


def test_injectors_in_two_threads_share_the_trampoline(counter):
    """Threads share the [vdso]: the trampoline stays while any injector of the process
    still runs calls through it, and goes with the last one."""
    from pycr.leftovers import trampoline_address
    tids = proc.tasks(counter.pid)
    with seized(tids[0]) as a, seized(tids[1]) as b:
        first, second = Injector(a), Injector(b)
        assert first.call("gettid") == tids[0]
        assert second.call("gettid") == tids[1]
        first.restore()
        assert trampoline_address(counter.pid) is not None
        assert second.call("gettid") == tids[1]
        second.restore()
        assert trampoline_address(counter.pid) is None
    assert counter.report()["bad"] == 0
