"""Thin Python wrappers over the C core (pycr.native._core).

Errors come back as OSError carrying the errno (the C side returns -errno).
Buffers go to C through ffi.from_buffer, so nothing large is copied.
"""

import contextvars
import errno as _errno
import mmap
import os
from array import array

from ._core import ffi, lib
from ..abi import (MAP_ANONYMOUS, MAP_POPULATE, MAP_PRIVATE, NR, PAGE_IS_FILE, PAGE_IS_PRESENT, PAGE_IS_SWAPPED,
                   PM_FILE_OR_SHARED, PM_PRESENT, PM_SWAPPED)
from ..sysinfo import page_size

PAGE_SIZE = page_size()
_RUNS_PER_CALL = 1 << 16  # output slots per C call of pagemap_runs / pagemap_scan
_PAGEMAP_CHUNK = 1 << 16  # pagemap entries per pread: 512 KiB, 256 MiB of address space


def _check(ret, what=""):
    """Raise OSError for a -errno result, else return it."""
    if ret < 0:
        code = -ret
        msg = os.strerror(code)
        raise OSError(code, f"{what}: {msg}" if what else msg)
    return ret


def _fileno(fd):
    return fd if isinstance(fd, int) else fd.fileno()


def _runs_view(runs):
    """The runs as a uint64_t[] for C, and the number of (start, len) pairs."""
    if not isinstance(runs, array):
        runs = array("Q", runs)
    if runs.typecode not in ("Q", "L") or runs.itemsize != 8:
        raise TypeError("runs must be an array('Q') of alternating start,len")
    if len(runs) % 2:
        raise ValueError("runs must hold start,len pairs")
    return ffi.from_buffer("uint64_t[]", runs), len(runs) // 2, runs


# ---- memory of another task -----------------------------------------------

_copier = contextvars.ContextVar("pycr_copier", default=None)


class Copier:
    """The copy buffer of one dump: process_vm_readv lands there before write().

    Large batches amortise the per-call cost, and the buffer is prefaulted
    because a cold one is many times slower than a warm one; so it is made
    once per dump, not per call. `with Copier():` makes it the one
    vm_read_runs uses in this thread (or task) until the block ends, then
    unmaps it: two dumps, in two threads of one process, never share one.
    Its size is pycr.settings.copy_buffer() unless given.
    """

    def __init__(self, size=None):
        if size is None:
            from ..settings import copy_buffer
            size = copy_buffer()
        size -= size % PAGE_SIZE
        if size <= 0:
            raise ValueError(f"copy buffer of {size} bytes: at least one page is needed")
        self._buf = self._view = None       # mapped at first use (see expect)
        self.size = size
        self._token = None
        self._closed = False

    def expect(self, nbytes):
        """Only about nbytes will be copied through this buffer: if it is not mapped yet, make
        it no larger than a quarter of that (at least 1 MiB), since prefaulting a buffer costs a
        first touch per page and a small dump's copy does not need a large one."""
        if self._buf is None and not self._closed:
            want = max(1 << 20, nbytes // 4)
            self.size = max(2 * PAGE_SIZE, min(self.size, want - want % PAGE_SIZE))

    def _mapped(self):
        if self._closed:
            raise ValueError("the copier is closed")
        if self._buf is None:
            self._buf = mmap.mmap(-1, self.size, flags=MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE)
            self._view = ffi.from_buffer("unsigned char[]", self._buf)
        return self._view

    def __enter__(self):
        self._token = _copier.set(self)
        return self

    def __exit__(self, *exc):
        _copier.reset(self._token)
        self.close()

    def close(self):
        self._closed = True
        if self._view is not None:
            ffi.release(self._view)
            self._buf.close()
            self._view = self._buf = None

    @staticmethod
    def current():
        """The Copier of the enclosing `with Copier()` block, or None."""
        return _copier.get()

    def read_runs(self, pid, runs, fd, sums=None):
        """See vm_read_runs."""
        view = self._mapped()
        cruns, n, runs = _runs_view(runs)
        state = ffi.NULL
        if sums is not None:
            state = sums.reserve(sum(runs[1::2]))
        fail = ffi.new("uint64_t *")
        ret = lib.pycr_vm_read_runs(pid, cruns, n, _fileno(fd), view, self.size, fail, state)
        if ret == -_errno.EFAULT:
            raise OSError(_errno.EFAULT, f"pid {pid}: cannot read at {fail[0]:#x}")
        return _check(ret, f"pid {pid}: vm_read_runs")

    def sum_fd(self, sums, fd, offset, length):
        """Feed ChunkSums `sums` with `length` bytes of fd from offset, read into this buffer."""
        view = self._mapped()
        _check(lib.pycr_sums_fd(_fileno(fd), offset, length, view, self.size, sums.reserve(length)),
               "checksum read")


def _with_copier(need, use):
    """use(the current Copier), or use(a Copier made for this call alone, of at most
    `need` bytes rounded up to pages) outside a `with Copier()` block."""
    copier = Copier.current()
    if copier is not None:
        return use(copier)
    from ..settings import copy_buffer
    size = min(copy_buffer(), max(PAGE_SIZE, -(-need // PAGE_SIZE) * PAGE_SIZE))
    with Copier(size) as copier:
        return use(copier)


def vm_read_runs(pid, runs, fd, sums=None):
    """Copy the runs of task `pid` to `fd` in order; returns bytes written.

    The dump hot path: process_vm_readv in batches of up to 1024 remote
    iovecs into the current Copier's buffer, then write(); outside a
    `with Copier()` block a buffer is made for this call alone. An
    unreadable address raises OSError(EFAULT) naming it. sums (a ChunkSums)
    is fed every byte written, from the buffer that is still in cache.
    """
    need = sum(array("Q", runs)[1::2]) if not isinstance(runs, array) else sum(runs[1::2])
    return _with_copier(need, lambda c: c.read_runs(pid, runs, fd, sums))


def vm_write_runs(pid, runs, src, src_offset=0):
    """Write the runs of task `pid` from `src`, consumed consecutively.

    The restore hot path: `src` is any buffer (typically an mmap of a pages
    file) and is not copied. Returns bytes written. Read-only target
    mappings give EFAULT here; use mem_write for those.
    """
    cruns, n, runs = _runs_view(runs)
    need = sum(runs[1::2])
    view = ffi.from_buffer("unsigned char[]", src)
    if src_offset < 0 or src_offset + need > len(view):
        raise ValueError(f"runs need {need} bytes from offset {src_offset}, "
                         f"the source has {len(view)}")
    fail = ffi.new("uint64_t *")
    ret = lib.pycr_vm_write_runs(pid, cruns, n, view + src_offset, fail)
    if ret == -_errno.EFAULT:
        raise OSError(_errno.EFAULT, f"pid {pid}: cannot write at {fail[0]:#x}")
    return _check(ret, f"pid {pid}: vm_write_runs")


def vm_read(pid, addr, n):
    """Exactly `n` bytes at `addr` in task `pid` (OSError EFAULT if any is unreadable)."""
    buf = bytearray(n)
    _check(lib.pycr_vm_read(pid, addr, ffi.from_buffer(buf), n),
           f"pid {pid}: read {n} bytes at {addr:#x}")
    return bytes(buf)


def vm_write(pid, addr, data):
    """Write all of `data` at `addr` in task `pid` with process_vm_writev."""
    view = ffi.from_buffer(data)
    return _check(lib.pycr_vm_write(pid, addr, view, len(view)),
                  f"pid {pid}: write {len(view)} bytes at {addr:#x}")


def mem_write(pid, addr, data):
    """Write `data` at `addr` through /proc/PID/mem.

    Unlike process_vm_writev this goes through read-only mappings too
    (the kernel forces the write), which restore needs for r-- and r-x VMAs.
    """
    view = ffi.from_buffer(data)
    return _check(lib.pycr_mem_write(pid, addr, view, len(view)),
                  f"pid {pid}: /proc mem write at {addr:#x}")


# ---- pagemap ---------------------------------------------------------------

def _out_buffer(words):
    """An array('Q') of `words` slots with its C view, made per call.

    Callers size it by the range asked about (a VMA of a few pages needs a
    few slots), so that small VMAs, hundreds of them in a dump, cost little.
    """
    buf = array("Q", bytes(8 * words))
    return buf, ffi.from_buffer("uint64_t[]", buf)


def _pages_in(start, end):
    return max((end - start + PAGE_SIZE - 1) // PAGE_SIZE, 1)


def _append_runs(dst, src):
    """Append (start, len) runs, merging one that continues the last."""
    if dst and src and dst[-2] + dst[-1] == src[0]:
        dst[-1] += src[1]
        src = src[2:]
    dst.extend(src)


def pagemap_match(pagemap_fd, start, end, match, exclude=0):
    """Runs (start, len bytes) of pages in [start, end) whose pagemap entry has a
    bit of `match` and none of `exclude` (pycr.abi.PM_* bits).

    The one parser of /proc/PID/pagemap (an open fd): it reads the entries in
    512 KiB chunks in C.
    """
    pages = _pages_in(start, end)
    cap = min(_RUNS_PER_CALL, pages // 2 + 1)
    result = array("Q")
    out, cout = _out_buffer(2 * cap)
    _, centries = _out_buffer(min(_PAGEMAP_CHUNK, pages))
    resume = ffi.new("uint64_t *")
    fd = _fileno(pagemap_fd)
    while start < end:
        n = _check(lib.pycr_pagemap_runs(fd, start, end, match, exclude, centries, len(centries),
                                         cout, cap, resume), "pagemap read")
        _append_runs(result, out[:2 * n])
        start = resume[0]
    return result


def pagemap_runs(pagemap_fd, start, end, want_present=True, want_swapped=True,
                 anon_only=False):
    """Runs (start, len bytes) of pages in [start, end) that are present or swapped.

    With anon_only, pages whose entry has bit 61 (file page or shared anon)
    are left out. Asked with PAGEMAP_SCAN where the kernel has it: the kernel
    then returns runs, not 8 bytes per page (at 2 GiB, 2-3 ms against 15-17 ms
    for reading the entries); else by reading the pagemap entries.
    """
    global _scan_for_runs
    match = (PM_PRESENT if want_present else 0) | (PM_SWAPPED if want_swapped else 0)
    if _scan_for_runs and match:
        try:
            return _runs_by_scan(pagemap_fd, start, end, want_present, want_swapped, anon_only)
        except OSError as exc:
            if exc.errno not in (_errno.ENOTTY, _errno.EINVAL, _errno.EOPNOTSUPP):
                raise
            _scan_for_runs = False     # an older kernel: the entries are read from now on
    return pagemap_match(pagemap_fd, start, end, match, PM_FILE_OR_SHARED if anon_only else 0)


#: False once PAGEMAP_SCAN was refused (Linux before 6.7): pagemap_runs reads entries then.
_scan_for_runs = True


def _runs_by_scan(pagemap_fd, start, end, want_present, want_swapped, anon_only):
    """pagemap_runs' question as one PAGEMAP_SCAN: any of present/swapped, and (anon_only)
    not a file or shared page (PAGE_IS_FILE inverted in the mask: bit 61's meaning)."""
    anyof = (PAGE_IS_PRESENT if want_present else 0) | (PAGE_IS_SWAPPED if want_swapped else 0)
    mask = PAGE_IS_FILE if anon_only else 0
    found, _ = pagemap_scan(pagemap_fd, start, end, 0, mask, mask, anyof, anyof, narrated=False)
    runs = array("Q")
    for i in range(0, len(found), 3):
        _append_runs(runs, (found[i], found[i + 1] - found[i]))
    return runs


def pagemap_scan(pagemap_fd, start, end, flags, category_mask, category_inverted,
                 category_anyof_mask, return_mask, max_pages=0, narrated=True):
    """The PAGEMAP_SCAN ioctl over [start, end).

    Returns (array('Q') of start,end,categories triples, walk_end). With
    max_pages 0 the ioctl is repeated from walk_end until the range is done;
    otherwise it stops once max_pages pages were reported. narrated=False: the
    caller says in one -vv line what a series of walks found.
    """
    result = array("Q")
    cap = min(_RUNS_PER_CALL, _pages_in(start, end) + 1)
    vec, cvec = _out_buffer(3 * cap)
    walk_end = ffi.new("uint64_t *")
    fd = _fileno(pagemap_fd)
    left = max_pages
    pos = prev = start
    while True:
        n = _check(lib.pycr_pagemap_scan(fd, pos, end, flags, category_mask,
                                         category_inverted, category_anyof_mask,
                                         return_mask, left, cvec, cap,
                                         walk_end), "PAGEMAP_SCAN")
        got = vec[:3 * n]
        if result and got and result[-2] == got[0] and result[-1] == got[2]:
            result[-2] = got[1]
            got = got[3:]
        result.extend(got)
        pos = walk_end[0]
        if max_pages:
            left -= sum((got[i + 1] - got[i]) // PAGE_SIZE for i in range(0, len(got), 3))
            if left <= 0:
                break
        if pos >= end or pos == prev:
            break
        prev = pos
    from ..ptrace import narrate
    if narrated and narrate.enabled():
        narrate.log.debug("%s", narrate.pagemap_scan(start, end, flags, category_mask, category_inverted,
                                                      category_anyof_mask, return_mask, result, pos))
    return result, pos


def hash_pages(buffer, npages):
    """A 64-bit hash of each of the first `npages` 4 KiB pages of `buffer`."""
    view = ffi.from_buffer("unsigned char[]", buffer)
    if npages * PAGE_SIZE > len(view):
        raise ValueError(f"{npages} pages need {npages * PAGE_SIZE} bytes, "
                         f"the buffer has {len(view)}")
    out = array("Q", bytes(8 * npages))
    lib.pycr_hash_pages(view, npages, ffi.from_buffer("uint64_t[]", out))
    return out


# ---- checksums -------------------------------------------------------------

def crc32c(data, crc=0):
    """CRC-32C (Castagnoli) of data, continuing from crc (0 to start)."""
    view = ffi.from_buffer("unsigned char[]", data)
    return lib.pycr_crc32c(crc, view, len(view))


def crc32c_portable(data, crc=0):
    """The same CRC by a byte table, without the SSE4.2 instruction (for tests)."""
    view = ffi.from_buffer("unsigned char[]", data)
    return lib.pycr_crc32c_portable(crc, view, len(view))


class ChunkSums:
    """CRC-32C of every `chunk` bytes of a stream, fed in order (the last may be short).

    The state lives in C so that the dump's copy loop can feed it without
    coming back to Python; mark()/rewind() undo what was fed after a point
    (a copy that is rolled back and redone).
    """

    def __init__(self, chunk):
        if chunk <= 0:
            raise ValueError("chunk must be positive")
        self._state = ffi.new("struct pycr_sums *")
        self._state.chunk = chunk
        self._out = ffi.new("uint32_t[]", 64)
        self._state.out = self._out
        self._state.cap = 64

    @property
    def pos(self):
        """Bytes fed so far."""
        return self._state.pos

    def reserve(self, nbytes):
        """Room for the sums of nbytes more; returns the C state for native calls."""
        s = self._state
        need = s.n + nbytes // s.chunk + 2
        if need > s.cap:
            cap = max(need, 2 * s.cap)
            out = ffi.new("uint32_t[]", cap)
            ffi.memmove(out, self._out, s.n * 4)
            self._out, s.out, s.cap = out, out, cap
        return s

    def update(self, data):
        """Feed bytes written from Python."""
        view = ffi.from_buffer("unsigned char[]", data)
        _check(lib.pycr_sums_update(self.reserve(len(view)), view, len(view)), "checksum")

    def update_from_fd(self, fd, offset, length):
        """Feed `length` bytes read from fd at offset (verification of a file), through the
        current Copier's buffer."""
        _with_copier(length, lambda c: c.sum_fd(self, fd, offset, length))

    def mark(self):
        s = self._state
        return (s.pos, s.crc, s.n)

    def rewind(self, mark):
        s = self._state
        s.pos, s.crc, s.n = mark

    def sums(self):
        """array('I') of the sum of every chunk, the unfinished last one included."""
        s = self._state
        out = array("I")
        out.frombytes(ffi.buffer(self._out, s.n * 4))
        if s.pos % s.chunk:
            out.append(s.crc)
        return out


# ---- syscalls --------------------------------------------------------------

def syscall(nr, *args):
    """Raw syscall with up to six integer arguments, in full 64-bit width.

    Returns the kernel's result; a failure raises OSError(errno) (so a
    syscall whose legitimate result is negative cannot be made here).
    """
    if len(args) > 6:
        raise TypeError("a syscall takes at most 6 arguments")
    regs = [ffi.cast("long", a) for a in args] + [0] * (6 - len(args))
    return _check(lib.pycr_syscall6(nr, *regs), f"syscall {nr}")


def pidfd_open(pid, flags=0):
    """A pidfd for `pid` (close it when done)."""
    return syscall(NR["pidfd_open"], pid, flags)


def pidfd_getfd(pidfd, fd, flags=0):
    """A duplicate, in this process, of file descriptor `fd` of the pidfd's task."""
    return syscall(NR["pidfd_getfd"], pidfd, fd, flags)



def dup_from(pid, fd):
    """A copy, in this process, of fd `fd` of process pid (pidfd_open + pidfd_getfd):
    the same open file description. The caller closes it."""
    pidfd = pidfd_open(pid)
    try:
        return pidfd_getfd(pidfd, fd)
    finally:
        os.close(pidfd)

def pidfd_send_signal(pidfd, sig, flags=0):
    """Send `sig` to the pidfd's task (works for non-children, no PID reuse race)."""
    return syscall(NR["pidfd_send_signal"], pidfd, sig, 0, flags)


def kcmp(pid1, pid2, type, idx1=0, idx2=0):
    """0 if the two tasks share the resource, else 1 or 2 (an ordering)."""
    return syscall(NR["kcmp"], pid1, pid2, type, idx1, idx2)


def tee(fd_in, fd_out, n, flags=0):
    """Duplicate up to `n` bytes from pipe fd_in into pipe fd_out without consuming them."""
    return syscall(NR["tee"], _fileno(fd_in), _fileno(fd_out), n, flags)


def clone3_exec(set_tid, flags, path, argv):
    """Create a child with the chosen PIDs that execs `path` at once; returns its PID.

    set_tid[0] is the PID in the innermost namespace (with CLONE_NEWPID in
    flags: the new one). The child gets exit_signal SIGCHLD, default
    SIGPIPE/SIGXFSZ and an empty signal mask, and inherits this process's
    file descriptors that are not close-on-exec. If execve fails the child
    exits with 127. A PID in use raises OSError(EEXIST).
    """
    tids = ffi.new("int[]", [int(t) for t in set_tid]) if set_tid else ffi.NULL
    cpath = ffi.new("char[]", os.fsencode(path))
    cargs = [ffi.new("char[]", os.fsencode(a)) for a in argv]
    cargv = ffi.new("char *[]", cargs + [ffi.NULL])
    ret = lib.pycr_clone3_exec(tids, len(set_tid), flags, cpath, cargv)
    return _check(ret, f"clone3 with set_tid {list(set_tid)}")


def stub_path():
    """Path of the installed restore stub (pycr-stub, beside the compiled core)."""
    from . import _core
    return os.path.join(os.path.dirname(os.path.abspath(_core.__file__)), "pycr-stub")


# ---- the CPU -----------------------------------------------------------------

def cpuid(leaf, subleaf=0):
    """(eax, ebx, ecx, edx) of CPUID leaf/subleaf on the CPU this runs on."""
    out = ffi.new("uint32_t[4]")
    lib.pycr_cpuid(leaf, subleaf, out)
    return tuple(out)


def xgetbv(index=0):
    """XCR<index>; XCR0 names the state components the kernel enabled."""
    return lib.pycr_xgetbv(index)


# ---- the lazy-pages fault server ---------------------------------------------

class FaultServer:
    """The C fault server of `pycr lazy-pages` (faults.c): serves userfaultfds from pages files.

    files: [(fd, size, sums array('I'))], one CRC-32C per `chunk` bytes of each file (the
    manifest's); the server reads whole chunks and places only bytes whose chunk matched.
    add(uffd, runs) hands it a uffd (it owns the fd from then on) and the task's saved runs
    (start, length, file index, file offset, flags), sorted; serve() runs the loop (call it
    in a thread: the GIL is released) until finish_input() was called and every page is
    placed, or stop().
    """

    WIPEONFORK = lib.PYCR_LAZY_WIPEONFORK

    def __init__(self, files, chunk, readahead=15, remote=None):
        self._keep = [array("I", sums) for _, _, sums in files]
        self._files = ffi.new("struct pycr_lazy_file[]", max(len(files), 1))
        self._sums, self._ready = [], []
        for i, (fd, size, _) in enumerate(files):
            sums = ffi.from_buffer("uint32_t[]", self._keep[i])
            self._sums.append(sums)
            self._files[i].fd, self._files[i].size = fd, size
            self._files[i].sums, self._files[i].nsums = sums, len(self._keep[i])
            if remote is not None:
                ready = ffi.new("uint8_t[]", max(len(self._keep[i]), 1))
                self._ready.append(ready)
                self._files[i].ready = ready
        self._s = lib.pycr_lazy_new(self._files, len(files), chunk, readahead)
        if self._s == ffi.NULL:
            raise OSError(_errno.ENOMEM, "cannot make the fault server")
        if remote is not None:
            lib.pycr_lazy_set_remote(self._s, *remote)

    def landed(self, file, index, crc):
        """A remote source wrote chunk `index` of `file` (its CRC-32C checked already): the
        server may read it (it checks the sum again). Poke the arrived eventfd after this."""
        self._keep[file][index] = crc
        self._ready[file][index] = 2            # CHUNK_THERE, after the sum (faults.c)

    def there(self, file, index):
        return self._ready[file][index] == 2

    def add(self, uffd, runs):
        table = ffi.new("struct pycr_lazy_run[]", max(len(runs), 1))
        for i, (start, length, file, offset, flags) in enumerate(runs):
            table[i].start, table[i].len, table[i].file = start, length, file
            table[i].offset, table[i].flags = offset, flags
        _check(lib.pycr_lazy_add(self._s, uffd, table, len(runs)), "adding a userfaultfd")

    def finish_input(self):
        lib.pycr_lazy_finish_input(self._s)

    def stop(self):
        lib.pycr_lazy_stop(self._s)

    def push_from(self, when_ns):
        """Push nothing in the background before time.monotonic_ns() reaches when_ns."""
        lib.pycr_lazy_push_from(self._s, when_ns)

    def serve(self):
        """The loop; raises OSError naming what failed."""
        ret = lib.pycr_lazy_serve(self._s)
        if ret < 0:
            msg = ffi.string(self.stats_raw()[0].message).decode(errors="replace")
            raise OSError(-ret, f"{msg}: {os.strerror(-ret)}")

    def stats_raw(self):
        out, left = ffi.new("struct pycr_lazy_stats *"), ffi.new("uint64_t *")
        lib.pycr_lazy_stats(self._s, out, left)
        return out, left[0]

    def stats(self):
        """Counters: faults, fault_pages, pushed_pages, zero_pages, dropped, forks, uffds, left."""
        st, left = self.stats_raw()
        names = ("faults", "fault_pages", "pushed_pages", "zero_pages", "dropped", "forks", "uffds")
        out = {name: getattr(st, name) for name in names}
        out["left"] = left
        return out

    def fault_times(self):
        """array('Q') of the ns each fault took, from its message read to its page placed."""
        n = lib.pycr_lazy_fault_times(self._s, ffi.NULL, 0)
        out = array("Q", bytes(8 * n))
        lib.pycr_lazy_fault_times(self._s, ffi.from_buffer("uint64_t[]", out), n)
        return out

    def close(self):
        """Free the server: every uffd it holds is closed (the kernel then drops the registrations)."""
        if self._s is not None:
            lib.pycr_lazy_free(self._s)
            self._s = None
