"""What this kernel and machine say about themselves, asked once and cached.

Page size, the lowest mappable address, the stack guard gap, the top of the
user address space, the tty driver majors and the pipe sizes differ between
machines, boot parameters and sysctls: pycr never hard-codes them.
"""

import ctypes
import functools
import os

from .abi import MAP_ANONYMOUS, MAP_FIXED_NOREPLACE, MAP_PRIVATE
from .errors import PycrError
from .proc.system import read_system

KERNEL_STACK_GUARD_PAGES = 256      # the kernel's stack_guard_gap default, in pages
TTY_DRIVERS = ("tty", "/dev/tty", "/dev/console", "/dev/ptmx", "pts", "ttyS", "/dev/vc/0",
               "ptm", "console", "ttyprintk", "hvc", "ttyAMA", "ttyUSB", "ttyACM")


@functools.cache
def page_size():
    return os.sysconf("SC_PAGE_SIZE")


@functools.cache
def mmap_min_addr():
    """/proc/sys/vm/mmap_min_addr: nothing can be mapped below it (without CAP_SYS_RAWIO)."""
    try:
        return max(int(read_system("sys/vm/mmap_min_addr")), page_size())
    except (PycrError, ValueError):
        return 1 << 16


def parse_stack_guard_gap(cmdline, page):
    """The stack guard gap in bytes from a kernel command line (stack_guard_gap=PAGES)."""
    pages = KERNEL_STACK_GUARD_PAGES
    for word in cmdline.split():
        key, sep, value = word.partition("=")
        if key == "stack_guard_gap" and sep:
            try:
                pages = int(value, 0)
            except ValueError:
                pass
    return pages * page


@functools.cache
def stack_guard_gap():
    """Bytes the kernel keeps free below a growing stack (boot parameter stack_guard_gap)."""
    try:
        cmdline = read_system("cmdline")
    except PycrError:
        cmdline = ""
    return parse_stack_guard_gap(cmdline, page_size())


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_FAILED = ctypes.c_void_p(-1).value


def _can_map_at(addr):
    page = page_size()
    got = _libc.mmap(addr, page, 0, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
    if got in (None, MAP_FAILED):
        return False
    _libc.munmap(got, page)
    return got == addr


@functools.cache
def task_size():
    """One past the highest user address: 2^47 - page with 4-level paging, 2^56 - page with 5.

    Asked of the kernel by mapping the last page below each candidate top
    (an address past TASK_SIZE is refused whatever the hint).
    """
    page = page_size()
    for bits in (56, 47):
        top = (1 << bits) - page
        if _can_map_at(top - page):
            return top
    return (1 << 47) - page


def parse_char_majors(text, names=TTY_DRIVERS):
    """Majors of the character drivers in `names` from the text of /proc/devices."""
    majors, section = set(), None
    for line in text.splitlines():
        if line.endswith("devices:"):
            section = line.split()[0]
            continue
        words = line.split(None, 1)
        if section == "Character" and len(words) == 2 and words[0].isdigit():
            name = words[1].strip()
            if name in names or any(name.startswith(n) for n in names if not n.startswith("/")):
                majors.add(int(words[0]))
    return majors


@functools.cache
def tty_majors():
    """Character majors of tty drivers, as /proc/devices lists them on this machine."""
    try:
        return frozenset(parse_char_majors(read_system("devices")))
    except PycrError:
        return frozenset({4, 5, 136})


@functools.cache
def pts_majors():
    """Character majors of pty slaves (/dev/pts/N), as /proc/devices lists them."""
    try:
        return frozenset(parse_char_majors(read_system("devices"), ("pts",)))
    except PycrError:
        return frozenset()


def ptmx_rdev():
    """The device number of /dev/ptmx: every pty master fd has it, whatever its index."""
    try:
        return os.stat("/dev/ptmx").st_rdev
    except OSError:
        return None


@functools.cache
def pipe_default_size():
    """The capacity of a new pipe (16 pages on Linux, but asked: pipe-user-pages limits shrink it)."""
    import fcntl
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        return fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
    finally:
        os.close(r)
        os.close(w)


def pipe_max_size():
    """/proc/sys/fs/pipe-max-size: the largest pipe an unprivileged F_SETPIPE_SZ may ask for."""
    try:
        return int(read_system("sys/fs/pipe-max-size"))
    except (PycrError, ValueError):
        return 1 << 20


@functools.cache
def has_pku():
    """Whether the CPU has protection keys and the kernel enabled them (cpuinfo pku and ospke)."""
    try:
        text = read_system("cpuinfo")
    except PycrError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return {"pku", "ospke"} <= flags
    return False
