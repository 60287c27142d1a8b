"""The syscall-restart fix-up applied to registers of threads frozen inside a syscall."""

from types import SimpleNamespace

import pytest

from pycr.restore.threads import final_regs

U64 = (1 << 64) - 1
NAMES = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx",
         "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds",
         "es", "fs", "gs")


def thread(rax, orig_rax, rip=0x401002):
    regs = {name: 0 for name in NAMES}
    regs.update(rax=rax & U64, orig_rax=orig_rax & U64, rip=rip)
    return SimpleNamespace(regs=regs)


@pytest.mark.parametrize("err", [512, 513, 514])
def test_restartable_syscall_runs_again(err):
    regs = final_regs(thread(-err, 7))
    assert regs.rax == 7 and regs.rip == 0x401000 and regs.orig_rax == U64


def test_restart_block_becomes_eintr():
    regs = final_regs(thread(-516, 230))
    assert regs.rax == (-4) & U64 and regs.rip == 0x401002 and regs.orig_rax == U64


@pytest.mark.parametrize("rax,orig", [(5, 0), (-11, 1), (-512, -1), (0x1234, -1)])
def test_other_states_are_left_alone(rax, orig):
    regs = final_regs(thread(rax, orig))
    assert regs.rax == rax & U64 and regs.rip == 0x401002 and regs.orig_rax == U64
