"""`pycr pre-dump` and `pycr dump --prev-images-dir`: incremental image chains.

A pre-dump freezes the tree only for the cheap parts (tree, cores, mm, files,
the tracker's dirty set, re-arming tracking), thaws it, and copies the pages
while it runs. A page written during that copy is reported again by the next
pass, so each directory holds the pages written since its parent, and marks
every other present page in_parent. The final dump (--prev-images-dir without
pre-dump) stays frozen throughout, removes the tracker from the targets, and
is complete together with its chain.

A chain that does not fit (missing parent, another tree's, another tracker)
is refused with one line; a process whose tracking was lost (exec, the
program closed the userfaultfd) is copied whole with a warning.
"""

import os
import time

from . import manifest, options, outdir, proc, progress
from .abi import PF_EXITING
from .dump import DumpStats, collect_cpus, inventory, write_tree_images
from .errors import ImageError, PycrError, TaskGone, Unsupported
from .freeze import freeze
from .images import ImageDir
from .log import log
from .native.core import Copier
from .stats import phase
from .steps import deferred_signals, finish, step
from .trackers import ParentPass, make_tracker
from .trackers.base import check_parent_tree
from . import settings
from .sysinfo import page_size

PAGE = page_size()


def resolve_parent(images_dir, prev_images_dir):
    """The parent's path: absolute, or relative to images_dir (as criu takes it)."""
    return os.path.normpath(os.path.join(images_dir, prev_images_dir))


def open_parent(images_dir, prev_images_dir, root, pages_elsewhere=False):
    """ParentPass of --prev-images-dir, checked to be a whole pre-dump of this tree.

    pages_elsewhere: the chain's pages files went to a page server; the parent
    directory here may lack them (the rest of the set must be whole).

    Its set ID (parent.set_id) goes into this pass's manifest, which ties the
    chain: a restore refuses a parent directory whose ID differs. Its pages
    are checked chunk by chunk at restore, not here (this pass does not read them).
    """
    path = resolve_parent(images_dir, prev_images_dir)
    if not os.path.isdir(path):
        raise ImageError(path, "parent image directory (--prev-images-dir) does not exist")
    if os.path.realpath(path) == os.path.realpath(images_dir):
        raise ImageError(path, "--prev-images-dir is the images directory itself")
    set_id = bytes(manifest.verify(path, deep=False, pages_elsewhere=pages_elsewhere).set_id)
    parent = ParentPass(ImageDir(path))
    parent.set_id = set_id
    if str(parent.inventory.kind) != "pre-dump":
        raise ImageError(path, f"is a {parent.inventory.kind}, not a pre-dump: a chain grows only from pre-dumps")
    if parent.inventory.page_size != PAGE:
        raise ImageError(path, f"page size {parent.inventory.page_size} differs from this machine's {PAGE}")
    check_parent_tree(parent, root)
    return parent


def dump_incremental(root, images_dir, pre_dump=False, leave_running=False, prev_images_dir=None,
                     tracker="auto", stats=None, keep_frozen=False, overwrite=False, pages_sink=None,
                     frozen_hook=None, thawed_hook=None, durable=True, pages_done=None):
    """One pass of a chain rooted at `root` into images_dir. Returns 0.

    stats (a DumpStats) is filled in for benchmarks: frozen_seconds,
    total_seconds, pages_bytes, processes, threads, and frozen_at (the
    time.monotonic() of the freeze).
    keep_frozen (final dump only): neither kill nor thaw the tree, and return
    its FrozenTree instead of 0; the caller kills or thaws it (migration keeps
    the source stopped until the replica runs). The tracker's state in the
    targets (a userfaultfd) is left in place too: after a thaw the caller
    removes it (pycr.migrate.loop.untrack).
    pages_sink: a page server's client the pages files go to; the parent's pages are
    then expected on the server's side too (they are not looked for here).
    frozen_hook, thawed_hook: called right after the freeze, and right after a pre-dump thaws
    the tree (before its pages are read): a migration holds its CPU throttle off in between,
    where a throttled thread would run each syscall pycr injects only when its quota lets it.
    durable: False for a migration's passes, which are sent on at once (no fsync in the freeze).
    pages_done(file name): told of each pages file as soon as it is whole (ImageDir.pages_done).
    """
    if keep_frozen and pre_dump:
        raise ValueError("keep_frozen is for the final dump, not a pre-dump")
    stats = stats if stats is not None else DumpStats()
    started = time.monotonic()
    kind = "pre-dump" if pre_dump else "dump"
    with outdir.writing(images_dir, overwrite, pages_sink, durable) as imgdir, Copier(), \
            progress.step(kind):
        imgdir.pages_done = pages_done
        frozen = _one_pass(root, imgdir, pre_dump, leave_running, prev_images_dir, tracker, stats,
                           keep_frozen, frozen_hook, thawed_hook)
    if not keep_frozen:
        finish("pre-dump" if pre_dump else "dump")
    stats.total_seconds = time.monotonic() - started
    log.info("%s done: %.1f MiB of pages, frozen %.3f s, total %.3f s", kind,
             stats.pages_bytes / (1 << 20), stats.frozen_seconds, stats.total_seconds)
    return frozen if keep_frozen else 0


def _one_pass(root, imgdir, pre_dump, leave_running, prev_images_dir, tracker, stats, keep_frozen,
              frozen_hook=None, thawed_hook=None):
    """Write and seal one pass into imgdir; -> the FrozenTree if keep_frozen."""
    images_dir = imgdir.path
    parent = open_parent(images_dir, prev_images_dir, root, imgdir.pages_sink is not None) \
        if prev_images_dir else None
    trk = make_tracker(tracker, parent)
    # The userfaultfd stays in the targets when they are killed right after (closing it
    # costs injected syscalls while frozen), or when the caller takes it out later.
    trk.keep_in_target = keep_frozen or not (pre_dump or leave_running)
    final = not pre_dump
    kind = "pre-dump" if pre_dump else "dump"
    rel_parent = os.path.relpath(parent.imgdir.path, images_dir) if parent else ""
    pass_nr = parent.inventory.pass_nr + 1 if parent else 0

    with phase("freeze"):
        frozen = freeze(root, timeout=settings.freeze_timeout())
    frozen_at = time.monotonic()
    stats.frozen_at = frozen_at
    if frozen_hook is not None:
        frozen_hook()
    leaders = {pid: threads[0] for pid, threads in frozen.processes.items()}
    stats.processes = len(frozen.processes)
    stats.threads = sum(len(t) for t in frozen.processes.values())
    log.info("froze %d processes, %d threads; tracker %s, pass %d", stats.processes,
             stats.threads, trk.name, pass_nr)
    later = {}

    def memory(pid, vmas, imgdir):
        if final:
            with phase("tracker"):
                return trk.save_pages(pid, vmas, imgdir, live=False)
        later[pid] = vmas
        return 0

    # A final pass after others is the migration's downtime: it reads registers and injects brk()
    # (which waits for a smaps walk) before each walk starts, and copies the pages while
    # they run. The tree passed every check of the VMAs' flags in the passes before; the flags
    # are checked again after the copy. A hybrid's final pass needs them to choose its pages.
    pages_first = final and parent is not None and not options.current().lazy_anon
    try:
        for pid, leader in leaders.items():
            if leader.tid != pid:
                # Trackers inject and scan through /proc/PID, which a zombie leader no longer has.
                raise Unsupported(f"pid {pid}: its thread-group leader has exited; incremental dumps "
                                  "of such a process are not supported (a plain dump is)")
        layouts = {pid: trk.layout(pid) for pid in leaders}     # maps first: nothing injected yet
        cpu = collect_cpus(frozen, layouts=layouts) if pages_first else None     # each starts its walk
        for layout in layouts.values():
            layout.walk()
        for pid, leader in leaders.items():
            with phase("tracker"):
                trk.while_frozen(pid, leader, final)
        hidden = {pid: trk.hidden_fds(pid) for pid in leaders}
        stats.pages_bytes = write_tree_images(frozen, imgdir, memory=memory, hidden_fds=hidden, layouts=layouts,
                                              cpu=cpu, pages_first=pages_first)
        # a final dump leaving its private anonymous pages in the tree is restored only with them served
        lazy = final and options.current().lazy_anon
        inv = inventory(root, "lazy-dump" if lazy else kind, tracker=trk.name, parent=rel_parent, pass_nr=pass_nr)
    except BaseException:
        log.info("%s failed: detaching, the tree goes on as before", kind)
        try:
            trk.abort(leaders)
        finally:
            frozen.thaw()
        raise
    state = "frozen"
    try:
        step("release the tree" if (pre_dump or leave_running) else "kill the tree")
        if keep_frozen:
            pass
        elif pre_dump or leave_running:
            with phase("release"):
                frozen.thaw()
            state = "thawed"
            if thawed_hook is not None:
                thawed_hook()
        else:
            # Frozen ends with the SIGKILL, as in a plain dump: how soon the tree's parent
            # reaps it (init can take a second) is not the tree's downtime.
            stats.frozen_seconds = time.monotonic() - frozen_at
            with phase("waiting for PIDs to be free"):
                frozen.kill(timeout=settings.freeze_timeout())
            state = "killed"
        if state != "killed":
            stats.frozen_seconds = time.monotonic() - frozen_at
        if not keep_frozen:
            log.info("tree %s after %.3f s frozen", state, stats.frozen_seconds)
        for pid, vmas in later.items():
            try:
                with phase("tracker"):
                    stats.pages_bytes += trk.save_pages(pid, vmas, imgdir, live=True)
            except (TaskGone, OSError):
                # a process of the running tree exits while its pages are read: its /proc files
                # then fail with ENOENT, ESRCH or (pagemap, once its memory is gone) EIO
                if _alive(pid):
                    raise
                log.warning("pid %d exited during the pre-dump; its pages are left out", pid)
                imgdir.write("pagemap", {"owner": str(pid), "entries": []}, str(pid))
        step("write inventory and manifest")
        imgdir.write("inventory", inv)
        manifest.seal(imgdir, parent.set_id if parent else manifest.NO_ID)
    except BaseException:
        log.info("%s failed: taking pycr's tracking out of the tree, which goes on as before", kind)
        _undo_pass(root, frozen, trk, state)
        raise
    finally:
        trk.finish()
    return frozen


def _undo_pass(root, frozen, trk, state):
    """Leave no trace of a pass that failed after the freeze: the tracker's state
    made in the targets this pass goes (re-freezing the tree if it was thawed)."""
    if state == "killed":
        return
    if state == "frozen":
        try:
            trk.abort({pid: threads[0] for pid, threads in frozen.processes.items()})
        finally:
            frozen.thaw()
        return
    with deferred_signals():
        try:
            with freeze(root) as again:
                trk.abort({pid: threads[0] for pid, threads in again.processes.items()})
        except PycrError as exc:
            log.warning("could not take pycr's tracking out of the tree: %s (pycr cleanup -t %d does)",
                        exc, root)


def _alive(pid):
    """True while pid is a live process (not gone, not a zombie, not exiting)."""
    try:
        st = proc.stat(pid)
    except TaskGone:
        return False
    return st.state not in ("Z", "X") and not st.flags & PF_EXITING
