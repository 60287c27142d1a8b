"""Tunables that were once constants measured on one VM, with their defaults.

Each can be set in the environment; the defaults follow the machine where
that makes sense.

PYCR_COPY_BUFFER   bytes of the prefaulted buffer the dump copies memory
                   through (process_vm_readv -> write). Default: 32 MiB, but
                   at most 1/256 of MemTotal and at least 1 MiB (a large
                   buffer saves syscalls; it is resident for the whole dump).
PYCR_FREEZE_TIMEOUT  seconds every thread of a tree gets to reach its ptrace
                   stop (and a killed tree to leave /proc). Default: 10 s,
                   stretched by the load average per CPU above 1 (a busy
                   machine schedules a stopping thread later).
PYCR_GHOST_LIMIT   bytes a file deleted while open or mapped may hold for a dump
                   to save it with the images. Default: 64 MiB; a larger one
                   is refused by name.
PYCR_NET_TIMEOUT   seconds a network peer may take to send the rest of a frame it
                   began, or to take what pycr sends; also to send its hello and
                   authentication, and, a lazy dump's source with pages still to
                   send, to send its next one. Default: 30 s. Past it the peer
                   is dropped.
PYCR_NET_IDLE_TIMEOUT  seconds a network peer may be silent where a frame is due
                   while it works (a page server fsyncing a file, a dump copying
                   memory between two files). Default: 300 s.
PYCR_MIGRATE_DOUBT_TIMEOUT  seconds both sides of a migration between two hosts
                   try to settle it when the link dies at the commit point (the
                   destination keeps the replica stopped and waits for the source
                   to say whether it killed its tree). Default: 60 s.
PYCR_LAZY_PUSH_DELAY  seconds `pycr lazy-pages` serves faults only, after the
                   restored tree starts, before it pushes the other pages in
                   the background (the working set first). Default: 0.
"""

import os

from pycr.errors import PycrError
from pycr.proc.system import read_system

COPY_BUFFER_MAX = 32 << 20
COPY_BUFFER_MIN = 1 << 20
FREEZE_TIMEOUT_BASE = 10.0
GHOST_LIMIT = 64 << 20
NET_TIMEOUT = 30.0
NET_IDLE_TIMEOUT = 300.0
MIGRATE_DOUBT_TIMEOUT = 60.0


def _env(name, parse):
    text = os.environ.get(name)
    if text is None or text == "":
        return None
    try:
        value = parse(text)
    except ValueError:
        raise PycrError(f"{name}={text!r} is not a valid value") from None
    if value <= 0:
        raise PycrError(f"{name}={text!r} must be positive")
    return value


def mem_total():
    """MemTotal of /proc/meminfo in bytes (0 if unknown)."""
    try:
        for line in read_system("meminfo").splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (PycrError, ValueError, IndexError):
        pass
    return 0


def default_copy_buffer(total=None, page=None):
    from pycr.sysinfo import page_size
    total = mem_total() if total is None else total
    page = page or page_size()
    size = COPY_BUFFER_MAX
    if total:
        size = max(COPY_BUFFER_MIN, min(size, total // 256))
    return size // page * page


def copy_buffer():
    """Bytes of the dump's copy buffer (PYCR_COPY_BUFFER, rounded down to pages)."""
    from pycr.sysinfo import page_size
    value = _env("PYCR_COPY_BUFFER", lambda t: int(t, 0))
    if value is None:
        return default_copy_buffer()
    page = page_size()
    return max(value // page, 1) * page


def default_freeze_timeout(load=None, cpus=None):
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
    cpus = cpus or os.cpu_count() or 1
    return FREEZE_TIMEOUT_BASE * max(1.0, load / cpus)


def freeze_timeout():
    """Seconds a freeze (or the kill of a frozen tree) may take (PYCR_FREEZE_TIMEOUT)."""
    value = _env("PYCR_FREEZE_TIMEOUT", float)
    return default_freeze_timeout() if value is None else value


def ghost_limit():
    """Largest deleted file a dump saves with the images (PYCR_GHOST_LIMIT, bytes)."""
    value = _env("PYCR_GHOST_LIMIT", lambda t: int(t, 0))
    return GHOST_LIMIT if value is None else value


def net_timeouts():
    """(frame, idle) seconds of the network channel (PYCR_NET_TIMEOUT, PYCR_NET_IDLE_TIMEOUT)."""
    frame = _env("PYCR_NET_TIMEOUT", float) or NET_TIMEOUT
    idle = _env("PYCR_NET_IDLE_TIMEOUT", float) or NET_IDLE_TIMEOUT
    return frame, max(idle, frame)


def migrate_doubt_timeout():
    """Seconds to settle a migration whose link died at the commit point (PYCR_MIGRATE_DOUBT_TIMEOUT)."""
    return _env("PYCR_MIGRATE_DOUBT_TIMEOUT", float) or MIGRATE_DOUBT_TIMEOUT


def lazy_push_delay():
    """Seconds of fault-only serving before the background push (PYCR_LAZY_PUSH_DELAY)."""
    return _env("PYCR_LAZY_PUSH_DELAY", float) or 0.0
