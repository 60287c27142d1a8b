"""The raw ptrace(2) call and the request/option numbers pycr uses (x86_64).

Calls go through ctypes with explicit argument types so that 64-bit addresses
and data words reach the kernel intact. `ptrace_errno` gives the raw errno for
callers that must tell one failure from another (e.g. ENOENT ending a walk);
`ptrace` maps failures onto pycr.errors.
"""

import ctypes
import errno
import logging
import os

from pycr.errors import AccessDenied, PycrError, TaskGone
from pycr.log import log

TRACEME = 0
PEEKDATA = 2
PEEKUSER = 3
POKEDATA = 5
CONT = 7
KILL = 8
SINGLESTEP = 9
GETREGS = 12
SETREGS = 13
GETFPREGS = 14
SETFPREGS = 15
ATTACH = 16
DETACH = 17
SYSCALL = 24
SETOPTIONS = 0x4200
GETEVENTMSG = 0x4201
GETSIGINFO = 0x4202
SETSIGINFO = 0x4203
GETREGSET = 0x4204
SETREGSET = 0x4205
SEIZE = 0x4206
INTERRUPT = 0x4207
LISTEN = 0x4208
PEEKSIGINFO = 0x4209
GETSIGMASK = 0x420a
SETSIGMASK = 0x420b
SECCOMP_GET_FILTER = 0x420c
SECCOMP_GET_METADATA = 0x420d
GET_SYSCALL_INFO = 0x420e
GET_RSEQ_CONFIGURATION = 0x420f

O_TRACESYSGOOD = 1
O_TRACEFORK = 1 << 1
O_TRACEVFORK = 1 << 2
O_TRACECLONE = 1 << 3
O_TRACEEXEC = 1 << 4
O_TRACEVFORKDONE = 1 << 5
O_TRACEEXIT = 1 << 6
O_TRACESECCOMP = 1 << 7
O_EXITKILL = 1 << 20
O_SUSPEND_SECCOMP = 1 << 21

EVENT_FORK = 1
EVENT_VFORK = 2
EVENT_CLONE = 3
EVENT_EXEC = 4
EVENT_VFORK_DONE = 5
EVENT_EXIT = 6
EVENT_SECCOMP = 7
EVENT_STOP = 128

SYSCALL_INFO_NONE = 0
SYSCALL_INFO_ENTRY = 1
SYSCALL_INFO_EXIT = 2
SYSCALL_INFO_SECCOMP = 3

PEEKSIGINFO_SHARED = 1
NT_PRSTATUS = 1
NT_PRFPREG = 2
NT_X86_XSTATE = 0x202

_NAMES = {v: k for k, v in list(globals().items()) if k.isupper() and isinstance(v, int)
          and not k.startswith(("O_", "EVENT_", "NT_", "PEEKSIGINFO_", "SYSCALL_INFO_"))}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_libc.ptrace.restype = ctypes.c_long


def request_name(req):
    return _NAMES.get(req, hex(req))


def ptrace_errno(req, pid, addr=0, data=0):
    """ptrace(req, pid, addr, data) -> (result, errno); errno is 0 on success.

    addr and data are ints (addresses or plain words) or ctypes pointers.
    """
    ctypes.set_errno(0)
    res = _libc.ptrace(req, pid, addr, data)
    err = ctypes.get_errno()
    if res != -1:
        err = 0
    if log.isEnabledFor(logging.DEBUG):       # -vv narrates each request (narrate imports this module)
        from pycr.ptrace import narrate
        if req not in narrate.QUIET_REQUESTS:
            log.debug("%s", narrate.ptrace_text(req, pid, addr, data, res, err))
    return (-1, err) if err else (res, 0)


def error(req, pid, err):
    """The pycr error for a failed ptrace request on task pid."""
    name = request_name(req)
    if err == errno.ESRCH:
        return TaskGone(pid, f"PTRACE_{name}")
    if err in (errno.EPERM, errno.EACCES):
        return AccessDenied(f"pid {pid}: PTRACE_{name}: {os.strerror(err)}")
    return PycrError(f"pid {pid}: PTRACE_{name}: {os.strerror(err)}")


def ptrace(req, pid, addr=0, data=0):
    """ptrace(req, pid, addr, data) -> result, raising pycr errors on failure."""
    res, err = ptrace_errno(req, pid, addr, data)
    if err:
        raise error(req, pid, err)
    return res
