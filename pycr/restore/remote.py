"""One task of the tree being restored, driven by injected syscalls.

Remote wraps the ptrace layer's Thread and Injector with what a restore adds:
a scratch area in the task for syscall arguments, calls that fail with a
RestoreError naming the syscall, collecting the task an injected clone3
created (auto-attached through PTRACE_O_TRACEFORK/TRACECLONE), and moving
the trampoline when the stub's own text goes away.

`pid` is the PID the restored program sees (inside its PID namespace);
`real` is the same task seen from pycr, which ptrace and /proc need.
"""

import os

from pycr import proc
from pycr.errors import RestoreError, TaskGone
from pycr.ptrace import binding as B
from pycr.ptrace.inject import Injector
from pycr.abi import NAMES, NR
from pycr.ptrace.thread import Thread

TRAMPOLINE_CODE = b"\x0f\x05\xcc"


def wait_attach_stop(thread):
    """Consume the first stop of an auto-attached task (PTRACE_EVENT_STOP)."""
    while True:
        stop = thread.wait(timeout=10)
        if stop.gone:
            raise TaskGone(thread.tid, "died before its first stop")
        if stop.event == B.EVENT_STOP:
            return
        # A signal-delivery stop ahead of the attach stop: suppress it, the
        # task is not the restored program yet.
        thread.cont(0)


def find_code(pid, start, end, code=TRAMPOLINE_CODE):
    """Address of `code` inside [start, end) of task pid, or None."""
    data = proc.read_mem(pid, start, end - start)
    at = data.find(code)
    return None if at < 0 else start + at


class Remote:
    """A stopped thread of the restored tree that runs syscalls for pycr."""

    def __init__(self, thread, pid, real, trampoline):
        self.thread = thread
        self.pid = pid              # as the restored program sees it
        self.real = real            # as pycr sees it
        self.inj = Injector(thread, trampoline=trampoline, keep_xstate=False)
        self.scratch = None
        self._used = 0

    @property
    def trampoline(self):
        return self.inj.trampoline

    def retarget(self, trampoline):
        """Run later calls through the trampoline at this address."""
        self.inj.trampoline = trampoline

    # -- scratch memory for arguments
    def use_scratch(self, addr, size):
        self.scratch = (addr, size)
        self._used = 0

    def reset_scratch(self):
        self._used = 0

    def put(self, data):
        """Copy data into the scratch area (8-byte aligned) and return its address there."""
        if self.scratch is None:
            raise RestoreError(f"pid {self.pid}: no scratch area mapped yet")
        addr, size = self.scratch
        off = (self._used + 7) & ~7
        if off + len(data) > size:
            raise RestoreError(f"pid {self.pid}: {len(data)} bytes do not fit the scratch area")
        self.inj.write(addr + off, data)
        self._used = off + len(data)
        return addr + off

    def put_str(self, text):
        """A NUL-terminated path (surrogateescape keeps any byte) in scratch."""
        return self.put(os.fsencode(text) + b"\0")

    def read(self, addr, size):
        return self.inj.read(addr, size)

    def write(self, addr, data):
        self.inj.write(addr, data)

    # -- syscalls
    def call(self, name, *args):
        """Raw result of syscall `name` in the task (negative errno on failure)."""
        return self.inj.call(NR[name] if isinstance(name, str) else name, *args)

    def call_batch(self, calls):
        """Raw results of calls [(name, *args)] run in one stop (see Injector.call_batch)."""
        table = self.put(bytes((len(calls) + 2) * 64 + 8)) if self.scratch is not None else None
        return self.inj.call_batch(calls, table)

    def start(self, name, *args):
        """Begin syscall `name` and return while the task runs it (see Injector.start)."""
        self.inj.start(NR[name] if isinstance(name, str) else name, *args)

    def finish_call(self):
        """Raw result of the call start() began."""
        return self.inj.finish()

    def check(self, name, *args, what=""):
        """call() raising RestoreError("pid N: name(what): strerror") on failure."""
        res = self.call(name, *args)
        if -4096 < res < 0:
            label = name if isinstance(name, str) else NAMES.get(name, str(name))
            raise RestoreError(f"pid {self.pid}: {label}({what}) failed: {os.strerror(-res)}")
        return res

    def take_born(self):
        """Thread of the task the last injected clone3 created, after its attach stop."""
        if not self.inj.events:
            raise RestoreError(f"pid {self.pid}: clone3 created no task")
        _event, real = self.inj.events.pop()
        thread = Thread(real)
        wait_attach_stop(thread)
        return thread

    def finish(self):
        """Give the thread back its registers and signal mask from before the first call."""
        self.inj.restore()
