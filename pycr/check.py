"""`pycr check`: probe each kernel mechanism pycr relies on, for real.

Every line is the outcome of trying the mechanism on a throw-away process or
on pycr itself, not a guess from the kernel version.
"""

import contextlib
import ctypes
import json
import mmap
import os
import struct
import subprocess
import sys
import time
from dataclasses import dataclass

from .abi import (NR, PAGE_IS_PRESENT, PM_SOFT_DIRTY, PR_SET_MM, PR_SET_MM_MAP_SIZE, SIOCINQ, SIOCOUTQ, UFFD_API,
                  UFFD_PYCR_FEATURES, UFFD_PYCR_FLAGS, UFFD_USER_MODE_ONLY, UFFDIO_API)
from . import proc
from .errors import PycrError
from .native import core
from .sysinfo import page_size

PAGE = page_size()


@dataclass
class Finding:
    name: str
    ok: bool
    detail: str
    needed_for: str    # "dump/restore", "tracker", "--tcp-established" or "optional"


def _sleeper():
    """A child that just sleeps; the caller kills and reaps it."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, close_fds=True)


def _reap(child):
    child.kill()
    child.wait()


@contextlib.contextmanager
def _stopped_helper():
    """A throw-away child, seized and in an interrupt stop: -> (pid, Thread).
    Detached, killed and reaped on leaving."""
    from .ptrace.thread import Thread
    child = _sleeper()
    try:
        t = Thread(child.pid)
        t.seize(0)
        try:
            t.interrupt()
            t.wait(timeout=5)
            yield child.pid, t
        finally:
            t.detach()
    finally:
        _reap(child)


def check_ptrace():
    """Seize a helper, and prove the register round trip a dump and restore make:
    GETREGS/SETREGS and the whole NT_X86_XSTATE regset (get, set, get), at the
    size CPUID leaf 0xD gives for this CPU."""
    from .ptrace import xstate as X
    try:
        with _stopped_helper() as (_, t):
            regs = t.get_regs()
            t.set_regs(regs)
            xs = t.get_xstate()
            t.set_xstate(xs)
            same = t.get_regs() == regs and t.get_xstate() == xs
    except Exception as exc:
        return Finding("ptrace registers", False, str(exc), "dump/restore")
    layout = X.local_layout()
    if not same:
        return Finding("ptrace registers", False, "registers or xstate read back different after a set",
                       "dump/restore")
    if len(xs) != layout.size:
        return Finding("ptrace registers", False, f"the kernel's xstate is {len(xs)} bytes, CPUID leaf 0xD "
                       f"says {layout.size}", "dump/restore")
    return Finding("ptrace registers", True,
                   f"SEIZE/INTERRUPT; regs and xstate get/set/get round trip; xstate {len(xs)} bytes "
                   f"(XCR0 {layout.xcr0:#x}: {X.component_names(layout.xcr0)})", "dump/restore")


def check_injection():
    """Run a syscall inside a helper the way a dump does, then a batch of them in one
    stop, and check that the helper is left exactly as it was: registers, blocked
    mask, memory ([vdso] included), maps."""
    from .leftovers import trampoline_address
    from .proc import maps, read_mem
    from .ptrace.inject import Injector
    try:
        with _stopped_helper() as (pid, t):
            regs, mask, layout = t.get_regs(), t.get_sigmask(), maps(pid)
            vdso = next(v for v in layout if v.kind == "vdso")
            image = read_mem(pid, vdso.start, vdso.size)
            with Injector(t) as inj:
                got = inj.call("getpid")
                batched = inj.call_batch([("getpid",), ("getppid",), ("gettid",)])
                how = "in one stop" if inj.batch_loop() else "one by one"
            same = (t.get_regs() == regs and t.get_sigmask() == mask and maps(pid) == layout
                    and trampoline_address(pid) is None and read_mem(pid, vdso.start, vdso.size) == image)
    except Exception as exc:
        return Finding("syscall injection", False, str(exc), "dump/restore")
    if got != pid or batched != [pid, os.getpid(), pid] or not same:
        return Finding("syscall injection", False, f"getpid gave {got}, a batch getpid, getppid, gettid "
                       f"gave {batched}, or the helper was left changed", "dump/restore")
    return Finding("syscall injection", True, "getpid through a [vdso] trampoline with syscall stops "
                   f"and a recovery frame; getpid, getppid, gettid batched {how}; the helper left as it was",
                   "dump/restore")


def check_vm_rw():
    buf = bytearray(os.urandom(PAGE))
    addr = ctypes.addressof((ctypes.c_char * PAGE).from_buffer(buf))
    try:
        if core.vm_read(os.getpid(), addr, PAGE) != bytes(buf):
            return Finding("process_vm_readv/writev", False, "read back different bytes", "dump/restore")
        core.vm_write(os.getpid(), addr, b"\0" * PAGE)
        ok = bytes(buf) == b"\0" * PAGE
        return Finding("process_vm_readv/writev", ok, "bulk copies between address spaces", "dump/restore")
    except OSError as exc:
        return Finding("process_vm_readv/writev", False, exc.strerror, "dump/restore")


def check_soft_dirty():
    area = mmap.mmap(-1, PAGE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(area))
    try:
        proc.clear_refs("self", "4")
        area[0] = 1
        fd = proc.open_pagemap("self")
        try:
            dirty = core.pagemap_match(fd, addr, addr + PAGE, PM_SOFT_DIRTY)
        finally:
            os.close(fd)
        if dirty:
            return Finding("soft-dirty", True, "clear_refs 4 + pagemap bit 55", "tracker")
        return Finding("soft-dirty", False, "pagemap bit 55 stays clear after a write "
                       "(kernel built without CONFIG_MEM_SOFT_DIRTY)", "tracker")
    except OSError as exc:
        return Finding("soft-dirty", False, f"pagemap: {exc.strerror}", "tracker")
    except PycrError as exc:
        return Finding("soft-dirty", False, str(exc), "tracker")
    finally:
        del addr
        area.close()


def check_uffd_wp_async():
    try:
        fd = core.syscall(NR["userfaultfd"], UFFD_PYCR_FLAGS | UFFD_USER_MODE_ONLY)
    except OSError as exc:
        return Finding("userfaultfd WP_ASYNC", False, f"userfaultfd: {exc.strerror}", "tracker")
    try:
        import fcntl
        want = UFFD_PYCR_FEATURES
        arg = bytearray(struct.pack("<QQQ", UFFD_API, want, 0))
        try:
            fcntl.ioctl(fd, UFFDIO_API, arg, True)
        except OSError as exc:
            return Finding("userfaultfd WP_ASYNC", False, f"UFFDIO_API: {exc.strerror}", "tracker")
        _, features, _ = struct.unpack("<QQQ", arg)
        ok = features & want == want
        return Finding("userfaultfd WP_ASYNC", ok,
                       f"features {features:#x}" if ok else "kernel lacks UFFD_FEATURE_WP_ASYNC", "tracker")
    finally:
        os.close(fd)


def check_lazy_pages():
    """The round trip of `restore --lazy-pages`: a helper's page registered MISSING from pycr, and the
    native fault server placing a verified page from a file when the kernel (uname() into it) faults."""
    import signal
    import tempfile
    import threading
    from array import array
    from .abi import MAP_ANONYMOUS, MAP_PRIVATE, O_CLOEXEC, O_NONBLOCK, PROT_READ, PROT_WRITE
    from .ptrace.inject import Injector
    from .restore.lazy import enable
    name, need = "userfaultfd MISSING", "restore --lazy-pages"
    try:
        with _stopped_helper() as (pid, t), tempfile.TemporaryFile() as f:
            pattern = os.urandom(PAGE)
            f.write(pattern)
            f.flush()
            server = core.FaultServer([(f.fileno(), PAGE, array("I", [core.crc32c(pattern)]))], PAGE)
            killer = threading.Timer(10, lambda: os.kill(pid, signal.SIGKILL))   # never hang on a lost fault
            try:
                with Injector(t) as inj:
                    addr = inj.check("mmap", 0, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
                    made = inj.check("userfaultfd", O_CLOEXEC | O_NONBLOCK)
                    uffd = core.dup_from(pid, made)
                    inj.call("close", made)
                    enable(uffd, pid, [(addr, addr + PAGE, False)])
                    server.add(uffd, [(addr, PAGE, 0, 0, 0)])
                    server.finish_input()
                    server.push_from(time.monotonic_ns() + 3600 * 10**9)      # placed on fault only
                    thread = threading.Thread(target=server.serve, daemon=True)
                    thread.start()
                    killer.start()
                    got = inj.call("uname", addr)
                    thread.join(10)
                    data = core.vm_read(pid, addr, PAGE)
                stats = server.stats()
            finally:
                killer.cancel()
                server.close()
    except (PycrError, OSError) as exc:
        return Finding(name, False, str(exc), need)
    ok = got == 0 and data[390:] == pattern[390:] and stats["faults"] == 1 and stats["left"] == 0
    detail = "a kernel-mode fault served by UFFDIO_COPY from a checksummed file" if ok else \
        f"uname gave {got}, faults {stats['faults']}, the page {'is' if data[390:] == pattern[390:] else 'is not'} ours"
    return Finding(name, ok, detail, need)


def check_pagemap_scan():
    area = mmap.mmap(-1, 4 * PAGE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(area))
    fd = proc.open_pagemap("self")
    try:
        area[0] = 1
        runs, _ = core.pagemap_scan(fd, addr, addr + 4 * PAGE, 0, 0, 0, 0, PAGE_IS_PRESENT)
        found = len(runs) >= 3 and runs[0] == addr
        return Finding("PAGEMAP_SCAN", found, "ioctl on /proc/PID/pagemap (Linux 6.7+)"
                       if found else "scan did not report a present page", "tracker")
    except OSError as exc:
        return Finding("PAGEMAP_SCAN", False, f"ioctl: {exc.strerror} (needs Linux 6.7+)", "tracker")
    finally:
        os.close(fd)
        del addr
        area.close()


def _free_pid():
    last = proc.sysctl_int("kernel/ns_last_pid")
    pid_max = proc.sysctl_int("kernel/pid_max")
    for pid in list(range(last + 1000, pid_max)) + list(range(300, last)):
        if not proc.exists(pid):
            return pid
    raise OSError("no free pid")


def check_clone3_set_tid():
    try:
        want = _free_pid()
        pid = core.clone3_exec([want], 0, "/bin/true", ["true"])
        os.waitpid(pid, 0)
        return Finding("clone3 set_tid", pid == want, f"asked for pid {want}, got {pid}", "dump/restore")
    except OSError as exc:
        return Finding("clone3 set_tid", False, exc.strerror or str(exc), "dump/restore")
    except PycrError as exc:
        return Finding("clone3 set_tid", False, str(exc), "dump/restore")


def check_prctl_mm_map():
    """PR_SET_MM_MAP_SIZE answers 104 only where PR_SET_MM_MAP is built in."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    size = ctypes.c_uint(0)
    if libc.prctl(PR_SET_MM, PR_SET_MM_MAP_SIZE, ctypes.addressof(size), 0, 0) != 0:
        err = ctypes.get_errno()
        return Finding("PR_SET_MM_MAP", False, f"prctl: {os.strerror(err)} (CONFIG_CHECKPOINT_RESTORE?)",
                       "dump/restore")
    return Finding("PR_SET_MM_MAP", True, f"struct prctl_mm_map is {size.value} bytes", "dump/restore")


def check_pidfd_getfd():
    child = _sleeper()
    try:
        pidfd = core.pidfd_open(child.pid)
        try:
            os.close(core.pidfd_getfd(pidfd, 0))
        finally:
            os.close(pidfd)
        return Finding("pidfd_getfd", True, "duplicates a target's fd (pipes, userfaultfd)", "dump/restore")
    except OSError as exc:
        return Finding("pidfd_getfd", False, exc.strerror, "dump/restore")
    finally:
        _reap(child)


@contextlib.contextmanager
def _loopback_connection():
    """A TCP connection over 127.0.0.1 in pycr: -> (client, server). Closed on leaving."""
    import socket
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname(), timeout=5)
        server = None
        try:
            server, _ = listener.accept()
            server.settimeout(5)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            yield client, server
        finally:
            client.close()
            if server is not None:
                server.close()


def _queued(sock, request):
    import fcntl
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0]


def check_tcp_repair():
    """Read a live loopback connection in repair mode as a dump does (sequence numbers,
    queues, window), leave repair mode, and prove the connection still carries data both ways."""
    from . import tcp_repair
    try:
        with _loopback_connection() as (client, server):
            client.sendall(b"ping")
            deadline = time.monotonic() + 5
            while _queued(server, SIOCINQ) < 4 and time.monotonic() < deadline:
                time.sleep(0.001)
            tcp_repair.repair_on(server)
            try:
                conn, problem = tcp_repair.read(server)
            finally:
                tcp_repair.repair_off(server)
            server.sendall(b"pong")
            ok = (problem is None and conn.recv_data == b"ping" and server.recv(4) == b"ping"
                  and client.recv(4) == b"pong")
    except OSError as exc:
        return Finding("TCP repair", False, f"{exc.strerror or exc} (needs CAP_NET_ADMIN)", "--tcp-established")
    if not ok:
        return Finding("TCP repair", False, "the queue read in repair mode, or the connection after it, "
                       "did not carry the bytes sent", "--tcp-established")
    return Finding("TCP repair", True, f"TCP_REPAIR on/off; rcv_nxt {conn.inq_seq}, write_seq {conn.outq_seq}, "
                   "queues peeked; the connection goes on", "--tcp-established")


def check_tcp_lock():
    """pycr's socket filter on a connection in repair mode: a segment the peer sends is not
    acknowledged (it stays in the peer's send queue), and arrives once the filter is off."""
    from . import tcp_lock, tcp_repair
    try:
        with _loopback_connection() as (client, server):
            tcp_lock.lock(server)
            signed = tcp_lock.is_locked(server)
            tcp_repair.repair_on(server)
            try:
                client.sendall(b"x")
                time.sleep(0.05)
                held_back = _queued(client, SIOCOUTQ) == 1 and _queued(server, SIOCINQ) == 0
            finally:
                tcp_repair.repair_off(server)
                tcp_lock.unlock(server)
            start = time.monotonic()
            arrived = server.recv(1) == b"x" and _queued(client, SIOCOUTQ) == 0
            after = time.monotonic() - start
    except OSError as exc:
        return Finding("TCP lock (socket filter)", False, f"{exc.strerror or exc}", "--tcp-established")
    if not (signed and held_back and arrived):
        return Finding("TCP lock (socket filter)", False, "SO_GET_FILTER did not give pycr's filter back"
                       if not signed else "a segment sent while locked was acknowledged" if not held_back
                       else "the segment did not arrive after the unlock", "--tcp-established")
    return Finding("TCP lock (socket filter)", True, "SO_ATTACH_FILTER ret #0: a segment sent while locked is not "
                   f"acknowledged; retransmitted {after:.2f} s after the unlock", "--tcp-established")


def check_throttle():
    """Throttle a throw-away child as a migration's auto-converge would: into the group, quota, back."""
    from .migrate.throttle import Throttle, groups_of
    child = _sleeper()
    try:
        th = Throttle(child.pid, 1.0)
        if not th.available:
            return Finding("auto-converge throttle", False, f"none: {th.mechanism.detail}", "optional")
        try:
            if not th.set(20) or not groups_of(child.pid):
                return Finding("auto-converge throttle", False, th.mechanism.detail, "optional")
        finally:
            th.lift()
        if groups_of(child.pid):
            return Finding("auto-converge throttle", False, "the helper stayed in the throttle group", "optional")
        return Finding("auto-converge throttle", True, th.mechanism.detail.replace(str(child.pid), "ROOT"),
                       "optional")
    except (OSError, PycrError) as exc:
        return Finding("auto-converge throttle", False, str(exc), "optional")
    finally:
        _reap(child)


CHECKS = (check_ptrace, check_injection, check_vm_rw, check_clone3_set_tid, check_prctl_mm_map, check_pidfd_getfd,
          check_soft_dirty, check_uffd_wp_async, check_pagemap_scan, check_lazy_pages, check_tcp_repair, check_tcp_lock,
          check_throttle)


def _object_checks():
    from . import check_objects
    return check_objects.CHECKS


def run_checks():
    return [check() for check in CHECKS + _object_checks()]


def trackers_available(findings=None):
    """Tracker names usable on this kernel, best first; 'hash' works anywhere."""
    found = {f.name: f.ok for f in (findings or run_checks())}
    out = []
    if found.get("userfaultfd WP_ASYNC") and found.get("PAGEMAP_SCAN"):
        out.append("uffd-wp")
    if found.get("soft-dirty"):
        out.append("soft-dirty")
    out.append("hash")
    return out


def run_check(as_json=False):
    """Print the findings; exit status 0 when dump and restore can work here."""
    if os.geteuid() != 0:
        print("pycr: warning: not root; most checks need root (ptrace of other users, clone3 set_tid)",
              file=sys.stderr)
    findings = run_checks()
    essential_ok = all(f.ok for f in findings if f.needed_for == "dump/restore")
    trackers = trackers_available(findings)
    if as_json:
        print(json.dumps({"kernel": os.uname().release, "ok": essential_ok, "trackers": trackers,
                          "checks": [f.__dict__ for f in findings]}, indent=2))
    else:
        print(f"kernel {os.uname().release}")
        for f in findings:
            print(f"  {'yes' if f.ok else 'no ':3}  {f.name:26} {f.detail}  [{f.needed_for}]")
        print(f"dirty-page trackers here: {', '.join(trackers)} (auto picks {trackers[0]})")
        print("dump and restore: " + ("can work" if essential_ok else "cannot work (see 'no' lines above)"))
    return 0 if essential_ok else 1
