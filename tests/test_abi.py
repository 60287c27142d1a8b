"""pycr.abi is the one place for kernel numbers: the C sources and other tables must agree with it."""

import errno
import fcntl
import mmap
import os
import pathlib
import re
import resource
import signal
import termios

from pycr import abi

# The C sources are in the checkout (an installed pycr holds only what they built).
SOURCES = pathlib.Path(__file__).resolve().parents[1] / "pycr"
NATIVE = SOURCES / "native"


def _defines(path):
    """name -> int of every `#define NAME NUMBER` in a C or assembler source."""
    out = {}
    for name, value in re.findall(r"^#define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)U?L?\b", path.read_text(), re.M):
        out[name] = int(value, 0)
    return out


def test_the_stub_uses_the_modules_numbers():
    found = _defines(NATIVE / "stub.S")
    syscalls = {name[4:]: nr for name, nr in found.items() if name.startswith("SYS_")}
    assert syscalls, "stub.S defines no SYS_ numbers"
    for name, nr in syscalls.items():
        assert abi.NR[name] == nr, f"stub.S: SYS_{name} is {nr}, pycr.abi says {abi.NR[name]}"
    assert found["WALL"] == abi.WALL
    assert found["ECHILD"] == errno.ECHILD


def test_the_stub_writes_no_bare_numbers_into_rax():
    """Every syscall number in the stub goes through a #define that the test above checks."""
    text = (NATIVE / "stub.S").read_text()
    assert not re.findall(r"mov\s+\$\d+,\s*%eax", text)
    assert not re.findall(r"cmp\s+\$-\d+,", text)


def test_the_core_uses_the_modules_ioctl():
    assert _defines(NATIVE / "core.c")["PYCR_PAGEMAP_SCAN"] == abi.PAGEMAP_SCAN


def test_syscall_numbers_agree_with_python_ptrace():
    """python-ptrace's x86_64 table (its numbers from 512 up are x32 ones, left out)."""
    from ptrace.syscall.linux.x86_64 import SYSCALL_NAMES as table
    theirs = {name: nr for nr, name in table.items() if nr < 512}
    checked = [name for name in abi.NR if name in theirs]
    assert len(checked) > 100
    for name in checked:
        assert abi.NR[name] == theirs[name], name
    assert abi.NAMES[abi.NR["clone3"]] == "clone3"


def test_flags_agree_with_pythons_own_modules():
    same = {"O_ACCMODE": os, "O_RDONLY": os, "O_WRONLY": os, "O_RDWR": os, "O_CREAT": os, "O_EXCL": os,
            "O_TRUNC": os, "O_NONBLOCK": os, "O_CLOEXEC": os, "O_PATH": os, "SEEK_SET": os,
            "MFD_CLOEXEC": os, "WNOHANG": os, "PROT_READ": mmap, "PROT_WRITE": mmap, "PROT_EXEC": mmap,
            "MAP_SHARED": mmap, "MAP_PRIVATE": mmap, "MAP_ANONYMOUS": mmap, "MAP_POPULATE": mmap,
            "MADV_DONTNEED": mmap,
            "F_SETFD": fcntl, "FD_CLOEXEC": fcntl, "F_DUPFD_CLOEXEC": fcntl, "F_SETPIPE_SZ": fcntl,
            "F_GETPIPE_SZ": fcntl, "RLIMIT_NOFILE": resource, "F_GETLK": fcntl, "F_SETLK": fcntl,
            "F_OFD_GETLK": fcntl, "F_OFD_SETLK": fcntl, "F_RDLCK": fcntl, "F_WRLCK": fcntl, "F_UNLCK": fcntl,
            "LOCK_SH": fcntl, "LOCK_EX": fcntl, "LOCK_NB": fcntl, "LOCK_UN": fcntl,
            "ITIMER_REAL": signal, "ITIMER_VIRTUAL": signal, "ITIMER_PROF": signal,
            "TIOCEXCL": termios, "TIOCSCTTY": termios, "TIOCGPGRP": termios, "TIOCSPGRP": termios,
            "TIOCOUTQ": termios, "TIOCGWINSZ": termios, "TIOCSWINSZ": termios, "TIOCPKT": termios,
            "FIONREAD": termios, "TIOCGLCKTRMIOS": termios}
    for name, module in same.items():
        assert getattr(abi, name) == getattr(module, name), name
    for advice, name in abi.MADVISE_NAMED.values():
        if hasattr(mmap, name):
            assert getattr(mmap, name) == advice, name


def test_no_module_spells_a_syscall_number_of_its_own():
    """Numbers are asked of pycr.abi by name; no `SYS_x = N` or `NR_x = N` is written elsewhere."""
    pkg = SOURCES
    offenders = []
    for path in pkg.rglob("*.py"):
        if path.name == "abi.py":
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"\s*_?(SYS|NR)_\w+(\s*,\s*_?(SYS|NR)_\w+)*\s*=\s*[\d(]", line) \
                    or re.match(r"\s*(WALL|__WALL)\s*=\s*0x", line):
                offenders.append(f"{path.relative_to(pkg)}:{lineno}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
