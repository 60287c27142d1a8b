"""strace-style text for what pycr asks of the kernel in a task: injected syscalls
with decoded arguments and results, ptrace requests, clone3 with its set_tid.

Only built at -vv (logging.DEBUG): callers test `enabled()` first, so a lower
level costs one comparison. Every number comes from pycr.abi (names listed here,
values looked up there) or from Python's errno and signal modules; what has no
name is printed as a number: addresses in hex, counts and fds in decimal, and
unknown flag bits as a hex remainder after the known ones.
"""

import ctypes
import errno
import logging
import os
import signal
import struct

from pycr import abi
from pycr.log import log
from pycr.sysinfo import page_size
from pycr.ptrace import binding as B

_U64 = (1 << 64) - 1


def enabled():
    """True when -vv narration is wanted (checked before any text is built)."""
    return log.isEnabledFor(logging.DEBUG)


def _named(*names):
    """[(value, name)] of these pycr.abi constants."""
    return [(getattr(abi, name), name) for name in names]


_PROT = _named("PROT_READ", "PROT_WRITE", "PROT_EXEC")
_MAP = _named("MAP_SHARED", "MAP_PRIVATE", "MAP_DROPPABLE", "MAP_FIXED", "MAP_ANONYMOUS", "MAP_GROWSDOWN",
              "MAP_NORESERVE", "MAP_POPULATE", "MAP_FIXED_NOREPLACE")
_MREMAP = _named("MREMAP_MAYMOVE", "MREMAP_FIXED")
_ACCMODE = dict(_named("O_RDONLY", "O_WRONLY", "O_RDWR"))
_OPEN = _named("O_CREAT", "O_EXCL", "O_NOCTTY", "O_TRUNC", "O_APPEND", "O_NONBLOCK", "O_LARGEFILE",
               "O_DIRECTORY", "O_NOFOLLOW", "O_CLOEXEC", "O_PATH")
_CLOEXEC = _named("O_CLOEXEC")
_CLONE = _named("CLONE_VM", "CLONE_FS", "CLONE_FILES", "CLONE_SIGHAND", "CLONE_THREAD", "CLONE_SYSVSEM",
                "CLONE_NEWPID")
_MFD = _named("MFD_CLOEXEC", "MFD_ALLOW_SEALING")
_SEALS = _named("F_SEAL_SEAL", "F_SEAL_SHRINK", "F_SEAL_GROW", "F_SEAL_WRITE", "F_SEAL_FUTURE_WRITE", "F_SEAL_EXEC")
_FCNTL = dict(_named("F_DUPFD", "F_GETFD", "F_SETFD", "F_GETFL", "F_SETFL", "F_GETLK", "F_SETLK", "F_OFD_GETLK",
                     "F_OFD_SETLK", "F_DUPFD_CLOEXEC", "F_SETPIPE_SZ", "F_GETPIPE_SZ", "F_ADD_SEALS",
                     "F_GET_SEALS"))
_PRCTL = dict(_named("PR_SET_PDEATHSIG", "PR_SET_DUMPABLE", "PR_SET_KEEPCAPS", "PR_SET_NAME", "PR_CAPBSET_DROP",
                     "PR_SET_MM", "PR_SET_CHILD_SUBREAPER", "PR_GET_CHILD_SUBREAPER", "PR_SET_NO_NEW_PRIVS",
                     "PR_GET_TID_ADDRESS", "PR_CAP_AMBIENT", "PR_SET_VMA", "PR_TIMER_CREATE_RESTORE_IDS"))
#: prctl options whose second argument is a sub-option, with those sub-options' names
_PRCTL_SUB = {
    abi.PR_SET_MM: dict(_named("PR_SET_MM_MAP", "PR_SET_MM_MAP_SIZE")),
    abi.PR_CAP_AMBIENT: dict(_named("PR_CAP_AMBIENT_RAISE", "PR_CAP_AMBIENT_CLEAR_ALL")),
    abi.PR_SET_VMA: dict(_named("PR_SET_VMA_ANON_NAME")),
    abi.PR_TIMER_CREATE_RESTORE_IDS: dict(_named("PR_TIMER_CREATE_RESTORE_IDS_OFF", "PR_TIMER_CREATE_RESTORE_IDS_ON",
                                                 "PR_TIMER_CREATE_RESTORE_IDS_GET")),
}
_IOCTL = dict(_named("TIOCGPTN", "TIOCSPTLCK", "TIOCGPKT", "TIOCGPTLCK", "TIOCGEXCL", "TIOCEXCL", "TIOCSCTTY",
                     "TIOCGPGRP", "TIOCSPGRP", "TIOCOUTQ", "TIOCGWINSZ", "TIOCSWINSZ", "TIOCPKT", "FIONREAD",
                     "TIOCGSID", "TIOCGLCKTRMIOS", "TCGETS2", "TCSETS2", "SIOCOUTQNSD", "UFFDIO_API",
                     "UFFDIO_REGISTER", "PAGEMAP_SCAN", "TFD_IOC_SET_TICKS"))
_ARCH_PRCTL = dict(_named("ARCH_GET_XCOMP_PERM", "ARCH_REQ_XCOMP_PERM"))
_SECCOMP = dict(_named("SECCOMP_SET_MODE_STRICT", "SECCOMP_SET_MODE_FILTER"))
_EPOLL_CTL = dict(_named("EPOLL_CTL_ADD", "EPOLL_CTL_DEL", "EPOLL_CTL_MOD"))
_MADVISE = dict([(abi.MADV_DONTNEED, "MADV_DONTNEED")] + list(abi.MADVISE_NAMED.values()))
_ITIMER = dict(_named("ITIMER_REAL", "ITIMER_VIRTUAL", "ITIMER_PROF"))
_RESTART = dict(_named("ERESTARTSYS", "ERESTARTNOINTR", "ERESTARTNOHAND", "ERESTART_RESTARTBLOCK"))


def _signed(value, bits=64):
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def flags(value, table, zero="0"):
    """`A|B|0x40` for the known bits of value, the unknown ones as a hex remainder."""
    value &= _U64
    parts, rest = [], value
    for bit, name in table:
        if bit and value & bit == bit:
            parts.append(name)
            rest &= ~bit
    if rest or not parts:
        parts.append(hex(rest) if rest or value else zero)
    return "|".join(parts)


def _choice(value, table):
    value = _signed(value, 32)
    return table.get(value, str(value))


def signame(sig):
    """A signal's name (SIGRTMIN, SIGRT_n for real-time ones, as strace), else its number."""
    sig = _signed(sig, 32)
    if abi.SIGRTMIN_KERNEL <= sig <= abi.NSIG:       # the kernel's numbering, not glibc's SIGRTMIN
        return "SIGRTMIN" if sig == abi.SIGRTMIN_KERNEL else f"SIGRT_{sig - abi.SIGRTMIN_KERNEL}"
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)


def addr(value):
    value &= _U64
    return "NULL" if value == 0 else hex(value)


def num(value):
    return str(_signed(value))


def fd(value):
    value = _signed(value, 32)
    return "AT_FDCWD" if value == abi.AT_FDCWD else str(value)


def _open_flags(value):
    value &= 0xFFFFFFFF
    mode = _ACCMODE.get(value & abi.O_ACCMODE, hex(value & abi.O_ACCMODE))
    rest = value & ~abi.O_ACCMODE
    return mode if not rest else mode + "|" + flags(rest, _OPEN)


def _string(read, value, limit=256):
    """The NUL-terminated string at value in the task, quoted as strace does; the address if unreadable."""
    if not value or read is None:
        return addr(value)
    try:
        data = read(value, min(limit, 4096 - (value & 4095)))
    except Exception:              # narration never changes what pycr does
        return addr(value)
    text = data.split(b"\0", 1)[0]
    more = "..." if b"\0" not in data else ""
    return '"' + text.decode("utf-8", "backslashreplace").replace('"', '\\"') + '"' + more


def clone_args(data):
    """struct clone_args (as bytes, set_tid already read as a list) in strace's braces."""
    fields = struct.unpack_from("<QQQQQQQQQQQ", data.ljust(88, b"\0"))
    flag_bits, _pidfd, _child_tid, _parent_tid, exit_signal, stack, stack_size, tls, _set_tid, set_tid_size, \
        cgroup = fields
    out = [f"flags={flags(flag_bits, _CLONE)}", f"exit_signal={signame(exit_signal) if exit_signal else 0}"]
    if stack:
        out.append(f"stack={addr(stack)}, stack_size={stack_size}")
    if tls:
        out.append(f"tls={addr(tls)}")
    return out, _set_tid, set_tid_size


def _clone3(read, args):
    at, size = (list(args) + [0, 0])[:2]
    try:
        data = read(at, min(size, 88)) if read and at else b""
    except Exception:
        data = b""
    if not data:
        return [addr(at), num(size)]
    out, set_tid, count = clone_args(data)
    if count and set_tid:
        try:
            tids = struct.unpack(f"<{min(count, 32)}i", read(set_tid, 4 * min(count, 32)))
            out.append(f"set_tid=[{', '.join(map(str, tids))}], set_tid_size={count}")
        except Exception:
            out.append(f"set_tid={addr(set_tid)}, set_tid_size={count}")
    return ["{" + ", ".join(out) + "}", num(size)]


def _prctl(read, args):
    args = list(args)
    if not args:
        return []
    option = _signed(args[0], 32)
    out = [_PRCTL.get(option, str(option))]
    rest = args[1:]
    if rest and option in _PRCTL_SUB:
        out.append(_choice(rest[0], _PRCTL_SUB[option]))
        rest = rest[1:]
    elif rest and option == abi.PR_SET_NAME:
        out.append(_string(read, rest[0], 16))
        rest = rest[1:]
    elif rest and option == abi.PR_SET_PDEATHSIG:
        out.append(signame(rest[0]) if rest[0] else "0")
        rest = rest[1:]
    if option == abi.PR_SET_VMA and len(rest) == 3:
        return out + [addr(rest[0]), num(rest[1]), _string(read, rest[2])]
    return out + [_plain(v) for v in rest]


def _fcntl(read, args):
    args = list(args) + [0, 0]
    cmd = _signed(args[1], 32)
    third = args[2]
    if cmd == abi.F_SETFD:
        arg = "FD_CLOEXEC" if third == abi.FD_CLOEXEC else num(third)
    elif cmd == abi.F_SETFL:
        arg = _open_flags(third)
    elif cmd == abi.F_ADD_SEALS:
        arg = flags(third, _SEALS)
    elif cmd in (abi.F_GETLK, abi.F_SETLK, abi.F_OFD_GETLK, abi.F_OFD_SETLK):
        arg = addr(third)
    else:
        arg = num(third)
    return [fd(args[0]), _FCNTL.get(cmd, str(cmd)), arg]


def _ioctl(read, args):
    args = list(args) + [0, 0]
    req = args[1] & 0xFFFFFFFF
    return [fd(args[0]), _IOCTL.get(req, hex(req)), _plain(args[2])]


def _plain(value):
    """A value of unknown meaning: addresses look like addresses, the rest like numbers."""
    value &= _U64
    signed = _signed(value)
    return hex(value) if signed >= 0x10000 else str(signed)


def _fmt(*kinds):
    """An argument decoder from one formatter per argument (extra arguments shown plain)."""
    def decode(read, args):
        out = []
        for i, value in enumerate(args):
            kind = kinds[i] if i < len(kinds) else _plain
            out.append(kind(read, value) if getattr(kind, "reads", False) else kind(value))
        return out
    return decode


def _reading(func):
    func.reads = True
    return func


_str = _reading(_string)
_mode = lambda v: f"0{v & 0o7777:o}" if v & 0o7777 else "0"     # noqa: E731
_sig = signame
_prot = lambda v: flags(v, _PROT, "PROT_NONE")             # noqa: E731
_map = lambda v: flags(v, _MAP)                            # noqa: E731
_cloexec = lambda v: flags(v, _CLOEXEC)                    # noqa: E731

#: syscall name -> decoder(read, args) -> [argument text]
_DECODERS = {
    "mmap": _fmt(addr, num, _prot, _map, fd, num),
    "munmap": _fmt(addr, num),
    "mprotect": _fmt(addr, num, _prot),
    "pkey_mprotect": _fmt(addr, num, _prot, num),
    "mremap": _fmt(addr, num, num, lambda v: flags(v, _MREMAP), addr),
    "madvise": _fmt(addr, num, lambda v: _choice(v, _MADVISE)),
    "openat": _fmt(fd, _str, _open_flags, _mode),
    "open": _fmt(_str, _open_flags, _mode),
    "close": _fmt(fd),
    "dup3": _fmt(fd, fd, _cloexec),
    "pidfd_getfd": _fmt(fd, fd, num),
    "pidfd_open": _fmt(num, num),
    "chdir": _fmt(_str),
    "chroot": _fmt(_str),
    "memfd_create": _fmt(_str, lambda v: flags(v, _MFD)),
    "fcntl": _fcntl,
    "ioctl": _ioctl,
    "prctl": _prctl,
    "arch_prctl": _fmt(lambda v: _choice(v, _ARCH_PRCTL), _plain),
    "seccomp": _fmt(lambda v: _choice(v, _SECCOMP), num, addr),
    "epoll_ctl": _fmt(fd, lambda v: _choice(v, _EPOLL_CTL), fd, addr),
    "clone3": _clone3,
    "rt_sigaction": _fmt(_sig, addr, addr, num),
    "rt_sigqueueinfo": _fmt(num, _sig, addr),
    "rt_tgsigqueueinfo": _fmt(num, num, _sig, addr),
    "kill": _fmt(num, _sig),
    "tgkill": _fmt(num, num, _sig),
    "sigaltstack": _fmt(addr, addr),
    "rt_sigtimedwait": _fmt(addr, addr, addr, num),
    "set_tid_address": _fmt(addr),
    "set_robust_list": _fmt(addr, num),
    "rseq": _fmt(addr, num, num, hex),
    "wait4": _fmt(num, addr, num, addr),
    "userfaultfd": _fmt(lambda v: flags(v, _OPEN)),
    "close_range": _fmt(fd, lambda v: str(v & 0xFFFFFFFF), num),
    "shmat": _fmt(num, addr, num),
    "setpgid": _fmt(num, num),
    "timer_create": _fmt(num, addr, addr),
    "mlock2": _fmt(addr, num, num),
    "getitimer": _fmt(lambda v: _choice(v, _ITIMER), addr),
    "setitimer": _fmt(lambda v: _choice(v, _ITIMER), addr, addr),
    "brk": _fmt(addr),
}


def syscall_text(nr, args, read=None):
    """`name(arg, ...)` of syscall nr; read(addr, n) reads the task's memory for strings and structs."""
    name = abi.NAMES.get(nr, f"syscall_{nr}")
    decode = _DECODERS.get(name)
    try:
        parts = decode(read, args) if decode else [_plain(v) for v in args]
    except Exception:              # a decoder's bug must not stop a dump: fall back to raw words
        parts = [_plain(v) for v in args]
    return f"{name}({', '.join(parts)})"


def result_text(nr, value):
    """strace's `= value` part: addresses for mmap and friends, `-1 ENOENT (No such file...)` for errors."""
    if -4096 < value < 0:
        err = -value
        if err in _RESTART:
            return f"? {_RESTART[err]}"
        return f"-1 {errno.errorcode.get(err, str(err))} ({os.strerror(err)})"
    if abi.NAMES.get(nr) in ("mmap", "mremap", "shmat", "brk"):
        return hex(value & _U64)
    return str(value)



# ---- ptrace requests ---------------------------------------------------------

#: the resume-and-look bookkeeping every stop repeats (each injected call makes several): the
#: injected syscall's own line stands for them
QUIET_REQUESTS = frozenset((B.SYSCALL, B.CONT, B.GET_SYSCALL_INFO, B.GETEVENTMSG))
_PTRACE_OPTIONS = [(getattr(B, name), "PTRACE_" + name) for name in dir(B) if name.startswith("O_")]
_REGSETS = {getattr(B, name): name for name in dir(B) if name.startswith("NT_")}


def _word(value):
    if value is None:
        return "NULL"
    if not isinstance(value, int):
        value = getattr(value, "value", None) or ctypes.cast(value, ctypes.c_void_p).value or 0
    return addr(value)


def ptrace_text(req, pid, addr_, data, res, err):
    """`ptrace(PTRACE_SEIZE, 123, NULL, PTRACE_O_TRACESYSGOOD) = 0`, with the regset and its
    length for GETREGSET/SETREGSET (read back from pycr's own iovec) and signals by name."""
    name = "PTRACE_" + B.request_name(req)
    if req in (B.SEIZE, B.SETOPTIONS):
        args = [_word(addr_), flags(data, _PTRACE_OPTIONS)]
    elif req in (B.GETREGSET, B.SETREGSET):
        iov = ctypes.cast(data, ctypes.POINTER(ctypes.c_uint64 * 2)).contents if data else (0, 0)
        args = [_REGSETS.get(addr_, hex(addr_)), f"{{iov_base={addr(iov[0])}, iov_len={iov[1]}}}"]
    elif req in (B.DETACH, B.CONT, B.SYSCALL, B.SINGLESTEP, B.LISTEN):
        args = [_word(addr_), signame(data) if isinstance(data, int) and data else "0"]
    elif req == B.INTERRUPT:
        args = []
    else:
        args = [_word(addr_), _word(data)]
    result = f"-1 {errno.errorcode.get(err, str(err))} ({os.strerror(err)})" if err else str(res)
    return f"ptrace({', '.join([name, str(pid)] + args)}) = {result}"


_PAGE_CATEGORIES = tuple((getattr(abi, n), n) for n in (
    "PAGE_IS_WPALLOWED", "PAGE_IS_WRITTEN", "PAGE_IS_FILE", "PAGE_IS_PRESENT", "PAGE_IS_SWAPPED",
    "PAGE_IS_PFNZERO", "PAGE_IS_HUGE", "PAGE_IS_SOFT_DIRTY"))
_SCAN_FLAGS = tuple((getattr(abi, n), n) for n in ("PM_SCAN_WP_MATCHING", "PM_SCAN_CHECK_WPASYNC"))


def pagemap_scan(start, end, scan_flags, category_mask, category_inverted, category_anyof_mask, return_mask,
                 regions, walk_end):
    """`ioctl(pagemap, PAGEMAP_SCAN, {...}) = N regions, P pages` for one walk of pycr.native.core."""
    pages = sum((regions[i + 1] - regions[i]) for i in range(0, len(regions), 3)) // page_size()
    return (f"ioctl(/proc/PID/pagemap, PAGEMAP_SCAN, {{start={start:#x}, end={end:#x}, "
            f"flags={flags(scan_flags, _SCAN_FLAGS)}, category_mask={flags(category_mask, _PAGE_CATEGORIES)}, "
            f"category_inverted={flags(category_inverted, _PAGE_CATEGORIES)}, "
            f"category_anyof_mask={flags(category_anyof_mask, _PAGE_CATEGORIES)}, "
            f"return_mask={flags(return_mask, _PAGE_CATEGORIES)}, walk_end={walk_end:#x}}}) = "
            f"{len(regions) // 3} regions, {pages} pages")
