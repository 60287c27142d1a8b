"""/proc/PID/mem, /proc/PID/pagemap and /proc/PID/clear_refs: memory, not text.

/proc/PID/mem reads through any protection (a tracer may), which is why
pycr reads code and unreadable VMAs there rather than with process_vm_readv.
Bulk copies open it once (open_mem) and pread at will: that is memory I/O,
not parsing, and stays with the caller; so do writes through it (the
Injector's, native.mem_write's). pagemap entries are parsed in C
(pycr.native.core.pagemap_runs), the one parser of that file; this module
only opens it.
"""

import os

from pycr.errors import from_oserror
from pycr.proc._read import path


def _open(pid, name, flags, tid=None):
    try:
        return os.open(path(pid, name, tid), flags | os.O_CLOEXEC)
    except OSError as exc:
        raise from_oserror(exc, pid, name) from None


def open_mem(pid, write=False):
    """An fd of /proc/PID/mem (close it when done)."""
    return _open(pid, "mem", os.O_RDWR if write else os.O_RDONLY)


def read_mem(pid, addr, length):
    """length bytes at addr of pid through /proc/PID/mem (fewer where the mapping ends)."""
    fd = open_mem(pid)
    try:
        return os.pread(fd, length, addr)
    except OSError as exc:
        raise from_oserror(exc, pid, f"mem at {addr:#x}") from None
    finally:
        os.close(fd)


def open_pagemap(pid):
    """An fd of /proc/PID/pagemap, for pycr.native.core.pagemap_runs/pagemap_scan."""
    return _open(pid, "pagemap", os.O_RDONLY)


def clear_refs(pid, what):
    """Write `what` to /proc/PID/clear_refs ("4": clear the soft-dirty bits)."""
    try:
        with open(path(pid, "clear_refs"), "w") as f:
            f.write(what)
    except OSError as exc:
        raise from_oserror(exc, pid, "clear_refs") from None


def open_fd(pid, fd, flags):
    """Open pid's file descriptor fd anew through /proc/PID/fd/N (another open file description)."""
    return _open(pid, f"fd/{fd}", flags)


def stat_fd(pid, fd):
    """os.stat of what pid's fd refers to."""
    try:
        return os.stat(path(pid, f"fd/{fd}"))
    except OSError as exc:
        raise from_oserror(exc, pid, f"fd {fd}") from None


def open_map_file(pid, start, end, flags=os.O_RDONLY):
    """Open what backs the VMA [start, end) of pid (/proc/PID/map_files, even a deleted file)."""
    return _open(pid, f"map_files/{start:x}-{end:x}", flags)
