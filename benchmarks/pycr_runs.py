"""pycr's dump, pre-dump and restore called in-process, with the figures a benchmark records.

Two frozen times are kept for every pass:
- frozen_seconds, pycr's own DumpStats figure: from the freeze until the tree is thawed,
  or killed and its PIDs are free again (a killed 2 GiB process takes a while to free its
  memory, and pycr waits for that so that a restore can follow);
- until_release_seconds, taken by FreezeClock: from the freeze until pycr starts to thaw
  or kill the tree. Every page is in the images by then. This is the figure comparable to
  criu's "Frozen time", which stops before criu kills the tree.
dump_tree (the plain `pycr dump`) only logs its DumpStats, so full_dump() reads it from
the "dump done" log record.
"""

import logging
import sys
import time
from contextlib import contextmanager

# pycr's modules are imported where they are used: `cli` times the pycr command, whose
# start-up would otherwise include every module a dump, a pre-dump and a restore need.


class _DoneRecord(logging.Handler):
    """Keeps the arguments of pycr's "dump done" record (MiB, frozen s, total s)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.args = None

    def emit(self, record):
        if record.msg.startswith("dump done:"):
            self.args = record.args


class FreezeClock:
    """When the last freeze returned, and when the tree was first thawed or killed after it."""

    def __init__(self):
        self.frozen_at = self.released_at = None

    @property
    def until_release(self):
        if self.frozen_at is None or self.released_at is None:
            return None
        return self.released_at - self.frozen_at


@contextmanager
def freeze_clock():
    """Stamp pycr's freeze and the following thaw or kill (by wrapping them) -> FreezeClock."""
    from pycr.freeze import FrozenTree
    clock = FreezeClock()
    real_freeze, real_thaw, real_kill = FrozenTree._freeze, FrozenTree.thaw, FrozenTree.kill

    def freeze(self, *args, **kwargs):
        real_freeze(self, *args, **kwargs)
        clock.frozen_at, clock.released_at = time.monotonic(), None

    def stamped(real):
        def release(self, *args, **kwargs):
            if clock.released_at is None:
                clock.released_at = time.monotonic()
            return real(self, *args, **kwargs)
        return release

    FrozenTree._freeze = freeze
    FrozenTree.thaw, FrozenTree.kill = stamped(real_thaw), stamped(real_kill)
    try:
        yield clock
    finally:
        FrozenTree._freeze, FrozenTree.thaw, FrozenTree.kill = real_freeze, real_thaw, real_kill


def full_dump(root, images_dir, leave_running=False):
    """`pycr dump` of the tree at root -> DumpStats (frozen_seconds, until_release_seconds,
    total_seconds, pages_bytes)."""
    from pycr.dump import DumpStats, dump_tree
    from pycr.log import log
    handler = _DoneRecord()
    level = log.level
    log.addHandler(handler)
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    started = time.monotonic()
    try:
        with freeze_clock() as clock:
            dump_tree(root, str(images_dir), leave_running=leave_running)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    stats = DumpStats()
    stats.total_seconds = time.monotonic() - started
    if handler.args is None:
        raise RuntimeError("pycr dump did not log its figures (\"dump done: ...\")")
    mib, stats.frozen_seconds, _ = handler.args
    stats.pages_bytes = int(round(mib * (1 << 20)))
    stats.until_release_seconds = clock.until_release
    return stats


def incremental_pass(root, images_dir, prev=None, pre_dump=True, tracker="uffd-wp"):
    """One pass of a chain (pre-dump, or the final dump when pre_dump is False) -> DumpStats."""
    from pycr.dump import DumpStats
    from pycr.predump import dump_incremental
    stats = DumpStats()
    with freeze_clock() as clock:
        dump_incremental(root, str(images_dir), pre_dump=pre_dump,
                         prev_images_dir=str(prev) if prev else None, tracker=tracker, stats=stats)
    stats.until_release_seconds = clock.until_release
    return stats


def timed_restore(images_dir):
    """Restore detached (the tree keeps its PIDs, no new namespace); -> seconds."""
    from pycr.restore.restorer import restore
    started = time.perf_counter()
    restore(str(images_dir), detach=True)
    return time.perf_counter() - started


def cli(argv=None):
    """`pycr` on the command line, plus one stderr line "frozen until release: S s".

    benchmarks.compare runs pycr through this (python -m benchmarks.pycr_runs dump ...):
    the same CLI, with the frozen time measured as criu measures its own.
    """
    from pycr.cli import main
    if not {"dump", "pre-dump", "migrate"} & set(sys.argv[1:] if argv is None else argv):
        return main(argv)                     # nothing is frozen: no clock to import
    with freeze_clock() as clock:
        try:
            status = main(argv)
        finally:
            if clock.until_release is not None:
                print(f"pycr: frozen until release: {clock.until_release:.6f} s", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(cli())
