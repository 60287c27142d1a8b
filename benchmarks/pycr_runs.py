"""pycr's dump, pre-dump and restore called in-process, with the figures a benchmark records.

dump_incremental fills a DumpStats; dump_tree (the plain `pycr dump`) keeps its own and
only logs it, so full_dump() reads that figure from its "dump done" log record. Frozen
time is pycr's own: from the end of the freeze to the thaw or the kill of the tree.
"""

import logging
import time

from pycr.dump import DumpStats, dump_tree
from pycr.log import log
from pycr.predump import dump_incremental
from pycr.restore.restorer import restore


class _DoneRecord(logging.Handler):
    """Keeps the arguments of pycr's "dump done" record (MiB, frozen s, total s)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.args = None

    def emit(self, record):
        if record.msg.startswith("dump done:"):
            self.args = record.args


def full_dump(root, images_dir, leave_running=False):
    """`pycr dump` of the tree at root -> DumpStats (frozen_seconds, total_seconds, pages_bytes)."""
    handler = _DoneRecord()
    level = log.level
    log.addHandler(handler)
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    started = time.monotonic()
    try:
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
    return stats


def incremental_pass(root, images_dir, prev=None, pre_dump=True, tracker="uffd-wp"):
    """One pass of a chain (pre-dump, or the final dump when pre_dump is False) -> DumpStats."""
    stats = DumpStats()
    dump_incremental(root, str(images_dir), pre_dump=pre_dump,
                     prev_images_dir=str(prev) if prev else None, tracker=tracker, stats=stats)
    return stats


def timed_restore(images_dir):
    """Restore detached (the tree keeps its PIDs, no new namespace); -> seconds."""
    started = time.perf_counter()
    restore(str(images_dir), detach=True)
    return time.perf_counter() - started
