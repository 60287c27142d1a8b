"""Running syscalls inside a ptrace-stopped thread, so that pycr's death at any
instant leaves the task running as it was.

Two trampolines:
- default (a live task): `syscall; mov $15,%eax; syscall` written into the
  zero padding at the end of the task's [vdso] text, and a recovery frame
  (pycr.ptrace.sigframe) of the task's own state written below its red zone.
  Each call resumes with PTRACE_SYSCALL and ends at the syscall-exit stop;
  the task is never single-stepped, so no trap flag is ever set. Should pycr
  die with the task anywhere inside an injection, the kernel detaches it, the
  injected call completes and rt_sigreturn loads the original registers,
  signal mask, alternate stack and extended state from the frame. The first
  injected call is sigaltstack(NULL, &frame.uc_stack): the kernel itself
  fills in the one part of the frame that cannot be read from outside.
  Syscall arguments go into scratch space below the frame when the stack has
  room, so a dump maps nothing into the task.
- given the address of `0f 05 cc` (the restore stub): PTRACE_CONT until the
  int3. A stub that loses pycr dies with it (PTRACE_O_EXITKILL), as it should.

call_batch() runs many calls in one stop through a loop next to either
trampoline (pycr.ptrace.batch), keeping the same property.

The injected syscalls leave the extended state alone (the kernel preserves
user FPU state across syscalls), so in the default mode it is read for the
recovery frame but never written back. All signals are blocked while
injecting; one that still stops the task (SIGSTOP) is recorded in
thread.held_signals for re-delivery at detach, never dropped.
"""

import contextlib
import errno
import os
import signal
import struct

from pycr.errors import PycrError, TaskGone, from_oserror
from pycr.log import log
from pycr.ptrace import binding as B
from pycr.ptrace import batch
from pycr.ptrace import narrate
from pycr.ptrace import sigframe
from pycr import abi as S
from pycr.abi import MAP_ANONYMOUS, MAP_PRIVATE, PROT_READ, PROT_WRITE
from pycr import proc
from pycr.native import core
from pycr.steps import deferred_signals, step
_U64 = 0xFFFFFFFFFFFFFFFF
_ARG_REGS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")
SCRATCH_BELOW_FRAME = 16 * 1024     # stack space for syscall arguments, when the stack has it
# pycr's stop signals are held inside one injected call, so that a handler that
# raises (Ctrl-C, SIGTERM) never runs between a syscall's entry and exit stops.


# pid -> [injectors of that process using the trampoline now, whether pycr wrote it]:
# threads of one process share the [vdso], so the last one out wipes it.
_TRAMPOLINE_USERS = {}


def _signed(value):
    return value - (1 << 64) if value & (1 << 63) else value


def _align_down(value, align):
    return value & ~(align - 1)


def vdso_text_end(image):
    """The end of what the [vdso] ELF image uses: headers, segments, sections.
    The rest of its last page is zero padding that nothing executes."""
    if image[:4] != b"\x7fELF":
        return None
    phoff, shoff = struct.unpack_from("<QQ", image, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", image, 0x36)
    end = max(0x40, phoff + phnum * phentsize, shoff + shnum * shentsize)
    for i in range(phnum):
        _, _, offset, _, _, filesz, _ = struct.unpack_from("<IIQQQQQ", image, phoff + i * phentsize)
        end = max(end, offset + filesz)
    for i in range(shnum):
        sh_type = struct.unpack_from("<I", image, shoff + i * shentsize + 4)[0]
        offset, size = struct.unpack_from("<QQ", image, shoff + i * shentsize + 0x18)
        if sh_type != 8:                                     # SHT_NOBITS takes no bytes
            end = max(end, offset + size)
    return end


class Injector:
    """Runs syscalls in `thread` (already in a ptrace stop); use as a context manager
    or call restore() when done. Nested injectors on one thread share the outer one."""

    def __init__(self, thread, trampoline=None, keep_xstate=True):
        self.thread = thread
        self.tid = thread.tid
        self.pid = proc.status(self.tid).tgid
        self.trampoline = trampoline
        self.keep_xstate = keep_xstate
        self.events = []          # (ptrace event, event message) seen during calls (fork, clone)
        self._saved = None        # (regs, xstate, sigmask) as found
        self._outer = None        # the injector already active on this thread, if any
        self._mem = None
        self._masked = False
        # default mode only
        self._code = None         # address of the trampoline in [vdso]
        self._batch_code = None   # address of the batch loop, where there was room for it
        self._own_code = False    # this injector wrote it (and removes it)
        self._frame = None        # address of the recovery frame
        self._stack_lo = None     # lowest stack address in use, with its original bytes
        self._stack_bytes = b""
        self._scratch_top = None  # next free byte (downwards) of the stack scratch area
        self._started = None      # (nr, trampoline, narration) of a call start() began
        self._workspace_loop = None   # trampoline mode: the batch loop found next to it
        self._own_ids = None      # (tgid, tid) as the task's own PID namespace numbers them

    # save / restore
    def save(self):
        if self._saved is not None or self._outer is not None:
            return
        active = getattr(self.thread, "injector", None)
        if self.trampoline is None and active is not None and active is not self:
            self._outer = active
            return
        t = self.thread
        regs = t.get_regs()
        xstate = t.get_xstate() if (self.keep_xstate or self.trampoline is None) else None
        mask = t.get_sigmask()
        self._saved = (regs, xstate, mask)
        if self.trampoline is None:
            try:
                self._place_recovery(regs, xstate, mask)
                self.thread.injector = self
                # The first call fills in the frame's uc_stack: only the task can read it.
                self.check("sigaltstack", 0, self._frame + sigframe.UC_STACK_OFFSET)
            except BaseException:
                self.restore()
                raise
        else:
            t.set_sigmask(_U64)
            self._masked = True

    def _place_recovery(self, regs, xstate, mask):
        """Write the trampoline into [vdso] padding and the recovery frame below the red zone."""
        vmas = proc.maps(self.tid)      # /proc/<tid>: still there when the leader has exited
        vdso = next((v for v in vmas if v.kind == "vdso"), None)
        if vdso is None:
            raise PycrError(f"pid {self.pid}: no [vdso] to hold pycr's syscall trampoline")
        end = vdso_text_end(self.read(vdso.start, vdso.size))
        code = vdso.start + ((end + 15) & ~15) if end is not None else None
        if code is None or code + len(sigframe.TRAMPOLINE) > vdso.end:
            raise PycrError(f"pid {self.pid}: no padding left in [vdso] for pycr's syscall trampoline")
        # The batch loop goes with the trampoline where the padding has room for it.
        want = batch.VDSO_CODE if code + len(batch.VDSO_CODE) <= vdso.end else sigframe.TRAMPOLINE
        found = self.read(code, len(want))
        users = _TRAMPOLINE_USERS.setdefault(self.pid, [0, False, len(want)])
        if found == bytes(len(found)):
            self.write(code, want)
            users[1:] = [True, len(want)]
        elif found != want:
            raise PycrError(f"pid {self.pid}: the padding of [vdso] at {code:#x} is not empty")
        users[0] += 1
        self._own_code = True
        self._code = code
        self._batch_code = code + batch.BATCH_AT if want is batch.VDSO_CODE else None

        sp = regs.rsp
        stack = next((v for v in vmas if v.start < sp - sigframe.RED_ZONE <= v.end), None)
        size = sigframe.frame_size(len(xstate or b""))
        frame = _align_down(sp - sigframe.RED_ZONE - size, 64)
        if stack is None or not stack.write or frame < stack.start:
            raise PycrError(f"tid {self.tid}: no room on its stack below {sp:#x} for pycr's "
                            f"recovery frame ({size} bytes)")
        lo = max(stack.start, frame - SCRATCH_BELOW_FRAME)
        self._stack_bytes = self.read(lo, frame + size - lo)
        self._stack_lo = lo
        self.write(frame, sigframe.build(regs, xstate, mask, frame))
        self._frame = frame
        self._scratch_top = frame

    def restore(self):
        """Put the task back as it was; nothing of pycr stays in it.

        Each item is put back on its own. If the mask or the registers cannot
        be written, the task is left at its trampoline with the recovery frame
        in place: on detach it runs rt_sigreturn into its original state.
        """
        if self._outer is not None:
            self._outer = None
            return
        if self._saved is None:
            self._close_mem()
            return
        regs, xstate, mask = self._saved
        self._saved = None
        t = self.thread
        if self.trampoline is not None:
            try:
                t.set_regs(regs)
                if xstate is not None:
                    t.set_xstate(xstate)
            finally:
                if self._masked:
                    t.set_sigmask(mask)
                self._masked = False
                self._close_mem()
            return
        if getattr(t, "injector", None) is self:
            t.injector = None
        if self._frame is None:          # nothing was written into the task's registers
            self._remove_traces()
            return
        try:
            if self._masked:
                t.set_sigmask(mask)
                self._masked = False
            t.set_regs(regs)
            self._back_to_interrupt_stop()
        except TaskGone:
            self._close_mem()
            raise
        except PycrError as exc:
            log.warning("tid %d: %s; it returns to its own state through pycr's recovery frame", self.tid, exc)
            self._leave_to_sigreturn(regs)
            self._close_mem()
            return
        self._remove_traces()

    def _back_to_interrupt_stop(self):
        """Leave the syscall-exit stop of the last injected call for an interrupt stop."""
        if self.thread.to_interrupt_stop().gone:
            raise TaskGone(self.tid, "exited while pycr returned it to its stop")

    def _leave_to_sigreturn(self, regs):
        """Point the task at the trampoline's rt_sigreturn (best effort)."""
        back = regs.copy()
        back.rip = self._code + sigframe.SIGRETURN_AT
        back.rsp = self._frame + 8
        back.orig_rax = _U64
        with contextlib.suppress(PycrError):
            self.thread.set_regs(back)

    def _remove_traces(self):
        """The stack bytes under the frame and the [vdso] padding, as they were."""
        try:
            if self._stack_lo is not None:
                self.write(self._stack_lo, self._stack_bytes)
            if self._own_code:
                users = _TRAMPOLINE_USERS.get(self.pid, [1, False, 0])
                users[0] -= 1
                if users[0] <= 0:      # the last of this process's injectors wipes what pycr wrote
                    _TRAMPOLINE_USERS.pop(self.pid, None)
                    if users[1]:
                        self.write(self._code, bytes(users[2]))
        except PycrError as exc:
            log.warning("tid %d: could not wipe pycr's trampoline or frame: %s", self.tid, exc)
        finally:
            self._stack_lo = self._frame = None
            self._own_code = False
            self._close_mem()

    def _close_mem(self):
        if self._mem is not None:
            os.close(self._mem)
            self._mem = None

    def __enter__(self):
        self.save()
        return self

    def __exit__(self, *exc):
        try:
            self.restore()
        except TaskGone:
            if exc[0] is None:
                raise
        return False

    @property
    def saved_regs(self):
        self.save()
        if self._outer is not None:
            return self._outer.saved_regs
        return self._saved[0].copy()

    # syscalls
    def call(self, nr, *args):
        """Run syscall nr with up to 6 args; the raw result (negative = -errno)."""
        if isinstance(nr, str):
            nr = S.NR[nr]
        if len(args) > 6:
            raise ValueError("a syscall takes at most 6 arguments")
        self.save()
        if self._outer is not None:
            return self._outer.call(nr, *args)
        regs = self._saved[0].copy()
        regs.rax = nr
        regs.orig_rax = _U64          # -1: no syscall-restart fixups on our return
        for name, value in zip(_ARG_REGS, args):
            setattr(regs, name, value & _U64)
        # -vv: arguments are decoded before the call (it may change the memory they point to)
        text = narrate.syscall_text(nr, args, self.read) if narrate.enabled() else None
        with deferred_signals():
            if self.trampoline is None:
                regs.rip = self._code
                regs.rsp = self._frame + 8
                res = self._run_syscall_stops(nr, regs)
            else:
                regs.rip = self.trampoline
                res = self._run_to_int3(nr, regs)
        if text is not None:
            who = f"pid {self.pid}" if self.tid == self.pid else f"pid {self.pid} tid {self.tid}"
            log.debug("%s: %s = %s", who, text, narrate.result_text(nr, res))
        return res

    def call_batch(self, calls, table_at=None):
        """Run calls [(nr or name, *args)] in order in one ptrace stop; their raw results.

        Every call runs whatever the earlier ones returned. In a live task (the default
        mode) the batch completes even if pycr dies meanwhile, so only calls that are
        harmless to complete belong in it. Where the loop has no room or no signal can
        end it (see pycr.ptrace.batch), the calls are injected one by one. table_at:
        memory in the task for (len(calls) + 2) * 64 + 8 bytes, else scratch() gives it."""
        calls = [(S.NR[c[0]] if isinstance(c[0], str) else c[0], *c[1:]) for c in calls]
        self.save()
        if self._outer is not None:
            return self._outer.call_batch(calls, table_at)
        loop, sig, why = self._batch_setup()
        if loop is None or len(calls) < 2:
            if why and len(calls) >= 2:
                log.info("pid %d: %d syscalls one by one: %s", self.pid, len(calls), why)
            return [self.call(nr, *args) for nr, *args in calls]
        texts = [narrate.syscall_text(nr, args, self.read) for nr, *args in calls] if narrate.enabled() else None
        extra = 0 if sig is None else 2
        size = (len(calls) + extra) * batch.ENTRY.size + 8
        with (contextlib.nullcontext(table_at) if table_at is not None else self.scratch(size)) as table_at:
            entries = list(calls)
            if sig is not None:
                mask_at = table_at + size - 8
                self.write(mask_at, struct.pack("<Q", _U64 & ~(1 << (sig - 1))))
                entries += [(S.NR["rt_sigprocmask"], S.SIG_SETMASK, mask_at, 0, 8),
                            (S.NR["tgkill"], *self._own_ids, sig)]
            self.write(table_at, batch.table(entries))
            if texts is not None:
                end = (f"tgkill({self._own_ids[0]}, {self._own_ids[1]}, {narrate.signame(sig)}) stops it"
                       if sig else "an int3 stops it")
                log.debug("pid %d: %d syscalls in one stop: a loop at %#x runs them, then %s",
                          self.pid, len(calls), loop, end)
            regs = self._saved[0].copy()
            regs.rip, regs.rbx, regs.r12, regs.orig_rax = loop, table_at, len(entries), _U64
            if self.trampoline is None:
                regs.rsp = self._frame + 8
            with deferred_signals():
                self._run_batch(regs, sig, table_at + (len(entries) - 1) * batch.ENTRY.size, calls[0][0])
            raw = self.read(table_at, len(calls) * batch.ENTRY.size)
        res = batch.results(raw, len(calls))
        if texts is not None:
            who = f"pid {self.pid}" if self.tid == self.pid else f"pid {self.pid} tid {self.tid}"
            for (nr, *_), text, value in zip(calls, texts, res):
                log.debug("%s: %s = %s", who, text, narrate.result_text(nr, value))
        return res

    def batch_loop(self):
        """Where call_batch's loop runs in this task, or None when calls go one by one."""
        self.save()
        if self._outer is not None:
            return self._outer.batch_loop()
        return self._batch_setup()[0]

    def _batch_setup(self):
        """(address of the batch loop, signal ending it or None for an int3, None) or
        (None, None, why the calls go one by one)."""
        if self.trampoline is not None:
            loop = self.trampoline + batch.WORKSPACE_AT
            if self._workspace_loop != loop:
                try:
                    here = self.read(loop, len(batch.WORKSPACE_CODE))
                except PycrError:
                    here = b""
                if here != batch.WORKSPACE_CODE:
                    return None, None, "no batch loop next to the trampoline"
                self._workspace_loop = loop
            return loop, None, None
        if self._batch_code is None:
            return None, None, "no room for the batch loop in [vdso] padding"
        st = proc.status(self.tid)
        sig = batch.end_signal(st, self._saved[2], self.thread.held_signals)
        if sig is None:
            return None, None, "every signal it ignores is handled, blocked or pending: none can end a batch"
        # tgkill runs in the task: its ids as its own PID namespace numbers them
        self._own_ids = (int(st.raw.get("NStgid", str(st.tgid)).split()[-1]),
                         st.nspid[-1] if st.nspid else self.tid)
        return self._batch_code, sig, None

    def _run_batch(self, regs, sig, last_entry, nr):
        """Run the loop to its stop: the int3 after it, or the end signal from the thread itself."""
        t = self.thread
        t.set_regs(regs)
        if self.trampoline is not None:
            self._await_int3(nr, regs.rip, end=regs.rip + len(batch.LOOP) + 1)
            return
        if not self._masked:
            t.set_sigmask(_U64)
            self._masked = True
            t.requeue_held()
        step(f"inject a batch of syscalls into {self.tid}")
        done_at = self._batch_code + batch.AFTER_SYSCALL
        while True:
            stop = self._next_stop(nr, t.cont)
            if stop.signal in (sig, signal.SIGSEGV, signal.SIGBUS, signal.SIGILL):
                now = t.get_regs()
                # The end signal, once unblocked by the next-to-last entry: pycr's own, or one
                # sent from outside meanwhile, which the kernel would drop untraced (no handler,
                # not blocked) and which stands for pycr's (a pending legacy signal is not queued twice).
                if stop.signal == sig and now.rip == done_at and \
                        now.rbx in (last_entry - batch.ENTRY.size, last_entry):
                    break
                if stop.signal != sig and self._batch_code <= now.rip < self._batch_code + len(batch.LOOP):
                    raise PycrError(f"tid {self.tid}: pycr's batch loop faulted at {now.rip:#x} "
                                    f"(signal {stop.signal})")
            t.hold_signal(stop)
        t.set_sigmask(_U64)       # the loop unblocked the end signal

    def start(self, nr, *args):
        """Begin syscall nr in the task and return at once, the task running it meanwhile;
        finish() waits for it and returns its raw result. Only through a trampoline (the
        restore stub), so that pycr can have calls run in several tasks at the same time.
        Nothing else may be done with this thread in between."""
        if isinstance(nr, str):
            nr = S.NR[nr]
        if self.trampoline is None:
            raise PycrError(f"tid {self.tid}: an overlapped injected call needs a trampoline")
        if len(args) > 6:
            raise ValueError("a syscall takes at most 6 arguments")
        self.save()
        regs = self._saved[0].copy()
        regs.rax = nr
        regs.orig_rax = _U64
        for name, value in zip(_ARG_REGS, args):
            setattr(regs, name, value & _U64)
        regs.rip = self.trampoline
        text = narrate.syscall_text(nr, args, self.read) if narrate.enabled() else None
        self.thread.set_regs(regs)
        self.thread.cont()
        self._started = (nr, regs.rip, text)

    def finish(self):
        """The raw result of the call start() began (negative = -errno)."""
        nr, addr, text = self._started
        self._started = None
        with deferred_signals():
            res = self._await_int3(nr, addr, resumed=True)
        if text is not None:
            log.debug("pid %d: %s = %s (overlapped)", self.pid, text, narrate.result_text(nr, res))
        return res

    def _run_syscall_stops(self, nr, regs):
        t = self.thread
        t.set_regs(regs)            # registers first: from here on, a detach ends in rt_sigreturn
        if not self._masked:
            t.set_sigmask(_U64)
            self._masked = True
            # A signal the freeze took from a signal-delivery stop goes back to pending
            # (blocked until rt_sigreturn or restore() unblocks it): held in pycr, it
            # would die with pycr.
            t.requeue_held()
        step(f"inject {S.NAMES.get(nr, nr)} into {self.tid}")
        entered = False
        while True:
            stop = self._next_stop(nr, t.syscall)
            if stop.signal & 0x7F == signal.SIGTRAP:
                op, value = t.syscall_info()
                if op == B.SYSCALL_INFO_ENTRY:
                    entered = True
                    continue
                if op == B.SYSCALL_INFO_EXIT and entered:
                    return value
                if op == B.SYSCALL_INFO_EXIT:    # the exit of the syscall the task was stopped in
                    continue
            t.hold_signal(stop)   # passed on at detach, never dropped

    def _next_stop(self, nr, resume, resumed=False):
        """Resume the thread (unless resumed: it already runs) and wait for a stop that says
        something about the call: fork and clone events are recorded, interrupt and group
        stops passed over."""
        t = self.thread
        while True:
            if not resumed:
                resume()
            resumed = False
            stop = t.wait()
            if stop.gone:
                raise TaskGone(self.tid, f"died during injected syscall {S.NAMES.get(nr, nr)}")
            if stop.event in (B.EVENT_FORK, B.EVENT_VFORK, B.EVENT_CLONE, B.EVENT_VFORK_DONE):
                self.events.append((stop.event, t.event_msg()))
            elif not stop.event:
                return stop

    def _run_to_int3(self, nr, regs):
        self.thread.set_regs(regs)
        return self._await_int3(nr, regs.rip)

    def _await_int3(self, nr, addr, resumed=False, end=None):
        t = self.thread
        end = addr + 3 if end is None else end
        while True:
            stop = self._next_stop(nr, t.cont, resumed)
            resumed = False
            if stop.signal == signal.SIGTRAP:
                now = t.get_regs()
                if now.rip == end:
                    return _signed(now.rax)
                raise PycrError(f"tid {self.tid}: injected syscall {S.NAMES.get(nr, nr)} "
                                f"trapped at {now.rip:#x}, expected {end:#x}")
            if stop.signal in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL) and \
                    t.get_regs().rip == addr:
                raise PycrError(f"tid {self.tid}: trampoline {addr:#x} is not executable "
                                f"(signal {stop.signal})")
            t.hold_signal(stop)

    def check(self, nr, *args):
        """Like call(), but a negative result raises the mapped pycr error."""
        res = self.call(nr, *args)
        if res < 0:
            name = nr if isinstance(nr, str) else S.NAMES.get(nr, str(nr))
            raise from_oserror(OSError(-res, os.strerror(-res)), self.pid,
                               f"injected {name}")
        return res

    @contextlib.contextmanager
    def scratch(self, size=4096):
        """Writable memory in the target for the duration of the block: stack space
        below the recovery frame when there is room, else a private anonymous mapping."""
        self.save()
        if self._outer is not None:
            with self._outer.scratch(size) as addr:
                yield addr
            return
        need = (size + 63) & ~63
        if self._scratch_top is not None and self._scratch_top - need >= self._stack_lo:
            top = self._scratch_top
            self._scratch_top = top - need
            try:
                yield top - need
            finally:
                self._scratch_top = top
            return
        addr = self.check("mmap", 0, size, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        try:
            yield addr
        finally:
            self.check("munmap", addr, size)

    # memory
    def _memfd(self):
        if self._mem is None:
            try:
                self._mem = os.open(f"/proc/{self.tid}/mem", os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise from_oserror(exc, self.pid, "mem") from None
        return self._mem

    def _through_gup(self, exc, how, addr, arg):
        """/proc/PID/mem cannot wait for a page a userfaultfd serves (a lazy restore): the kernel
        answers EIO at the first page, a short count at a later one. process_vm_readv/writev can (their page walk may sleep until the page is
        placed), so try once more through them; None if that fails too."""
        if exc.errno not in (errno.EIO, errno.EFAULT):
            return None
        try:
            return how(self.tid, addr, arg)
        except OSError:
            return None

    def read(self, addr, n):
        if self._outer is not None:
            return self._outer.read(addr, n)
        try:
            data = os.pread(self._memfd(), n, addr)
        except OSError as exc:
            data = self._through_gup(exc, core.vm_read, addr, n)
            if data is None:
                raise from_oserror(exc, self.pid, f"read {n} bytes at {addr:#x}") from None
        if len(data) != n:      # stopped at a later page a userfaultfd serves: the rest as above
            rest = self._through_gup(OSError(errno.EIO, "short read"), core.vm_read, addr + len(data),
                                     n - len(data))
            if rest is None:
                raise PycrError(f"pid {self.pid}: short read at {addr + len(data):#x}")
            data += rest
        return data

    def write(self, addr, data):
        if self._outer is not None:
            return self._outer.write(addr, data)
        try:
            done = os.pwrite(self._memfd(), bytes(data), addr)
        except OSError as exc:
            done = self._through_gup(exc, core.vm_write, addr, bytes(data))
            if done is None:
                raise from_oserror(exc, self.pid, f"write {len(data)} bytes at {addr:#x}") from None
        if done != len(data):   # stopped at a later page a userfaultfd serves: the rest as above
            more = self._through_gup(OSError(errno.EIO, "short write"), core.vm_write, addr + done,
                                     bytes(data[done:]))
            if more is None or done + more != len(data):
                raise PycrError(f"pid {self.pid}: short write at {addr + done:#x}")
