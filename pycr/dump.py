"""`pycr dump`: freeze a tree, write everything needed to bring it back, kill or resume it.

The order matters: everything that can refuse the dump (unsupported fds or
mappings) is checked before any image is written, and VMAs are read before
any syscall is injected (an injected scratch mmap is itself a VMA).
Whatever goes wrong, the tree is thawed exactly as it was.
"""

import platform
import time

from . import __version__, leftovers, manifest, outdir, proc, progress
from .collect.core import check_paths, collect_core, collect_thread
from .collect import ghost, memfd, sysvshm
from .collect.kinds import collect_objects
from .collect.file_locks import collect_file_locks
from .collect.timers import collect_posix_timers
from .collect.files import collect_files, collect_pipes_data, number_file_descriptions, describe_fd
from .collect.memory import dump_private_memory, dump_shmem, present_runs, private_vmas, shmem_vmas
from .collect.mm import Layout, check_supported, collect_mm, vma_record
from .collect.tty import check_terminals
from .collect.tree import check_pid_namespace, check_sessions, collect_pstree, reader
from .abi import NR
from .errors import PycrError
from .freeze import freeze
from .log import log
from .ptrace import xstate
from .native.core import Copier
from .ptrace.inject import Injector
from .stats import count, phase
from .steps import deferred_signals, finish, step
from . import settings
from .sysinfo import page_size

PAGE = page_size()


def inventory(root, kind, tracker="", parent="", pass_nr=0):
    return {
        "pycr_version": __version__,
        "kernel": platform.release(),
        "page_size": PAGE,
        "root_pid": root,
        "root_start_time": proc.stat(root).start_time,
        "kind": kind,
        "tracker": tracker,
        "parent": parent,
        "pass_nr": pass_nr,
        "created": time.time_ns(),
        "cpu": xstate.cpu_record(),
    }


class DumpStats:
    """What a dump did, for -v and for benchmarks."""

    def __init__(self):
        self.frozen_seconds = 0.0
        self.total_seconds = 0.0
        self.pages_bytes = 0
        self.processes = 0
        self.threads = 0


def _collect_files(pid, hidden):
    """collect_files, leaving out the fds in `hidden`."""
    if not hidden:
        return collect_files(pid)
    return [describe_fd(pid, fd, target) for fd, target in proc.fds(pid).items() if fd not in hidden]


def _warn_lonely_pipes(files_by_src):
    """A pipe whose other end is outside the tree has nothing there after a restore: say so
    now, while the user can still give the tree both ends (or a file) before restoring it."""
    from .restore.pipe_ends import PIPE_OUTLOOK, lonely_pipe_ends
    fds = ((rec["type"], rec["flags"], rec["pipe_id"]) for recs in files_by_src.values() for rec in recs)
    for pipe_id, missing in lonely_pipe_ends(fds).items():
        log.warning("pipe:[%d] has no %s in the tree; after a restore, %s once the restoring pycr exits, "
                    "unless it gets a new %s (restore --inherit-fd fd[N]:pipe:[%d])",
                    pipe_id, missing, PIPE_OUTLOOK[missing], missing, pipe_id)


def write_tree_images(frozen, imgdir, memory=None, hidden_fds=None, layouts=None, warn_pipes=False, cpu=None,
                      pages_first=False):
    """Collect and write every image of a frozen tree except the inventory.

    memory(pid, vmas, imgdir) -> bytes writes the pages of one process; the
    default saves every present page. Returns bytes of pages written.
    hidden_fds: {pid: fds} that are pycr's own (a tracker's userfaultfd) and
    are left out of the files image. layouts: {pid: collect.mm.Layout} made at the freeze.
    warn_pipes: warn of pipes with an end outside the tree (a dump's; not every pass of a migration).
    cpu: {pid: _collect_cpu(...)}, if the caller collected it already (collect_cpus).
    pages_first: copy each process's pages before its VMAs' flags are known, and check them
    after (a migration's final pass: the tree passed every check in the passes before it).
    """
    processes = frozen.processes
    count("processes", len(processes))
    count("threads", sum(len(t) for t in processes.values()))
    # /proc/PID of a process whose leader has exited has no maps, fds or cwd:
    # everything per process is read through a live thread (src) instead.
    srcs = {pid: reader(pid, threads) for pid, threads in processes.items()}
    if layouts is None:
        layouts = {pid: Layout(src) for pid, src in srcs.items()}
    # CPU state and injected reads first: they need no VmFlags, so they run while a
    # smaps walk started at the freeze is still going (brk() comes last and waits for it).
    if cpu is None:
        cpu = collect_cpus(frozen, srcs)
    with phase("/proc reads"):
        pstree, vmas_by_pid, files_by_src, objects, ghosts, locks = _read_tree(frozen, srcs, hidden_fds, layouts,
                                                                               pages_first)
    if warn_pipes:
        _warn_lonely_pipes(files_by_src)

    step("write pstree, files and pipes-data")
    imgdir.write("pstree", pstree)
    imgdir.write("files", {"processes": [{"pid": pid, "fds": files_by_src[src]} for pid, src in srcs.items()]})
    with phase("/proc reads"):
        pipes = collect_pipes_data(files_by_src)
    imgdir.write("pipes-data", {"pipes": [{"pipe_id": k, "data": data, "size": size}
                                          for k, (data, size) in pipes.items()]})
    for image, body in objects.items():
        imgdir.write(image, body)
    if locks:
        imgdir.write("file-locks", {"locks": locks})

    runs = {}
    if memory is None:
        # Which pages to copy, for the whole tree before any is copied: the progress bar's total.
        runs = {pid: present_runs(srcs[pid], private_vmas([vma_record(*v) for v in vmas_by_pid[pid]]))
                for pid in processes}
        total = sum(sum(r[1::2]) for r in runs.values())
        progress.total(total)
        if Copier.current() is not None:
            Copier.current().expect(total)
    written, posix_timers = 0, []
    for pid, threads in processes.items():
        src = srcs[pid]
        core_img, brk, timers = cpu[pid]
        if timers:
            posix_timers.append({"pid": pid, "timers": timers})
        if pages_first:
            written += _write_pages(pid, src, [vma_record(*v) for v in vmas_by_pid[pid]], imgdir, memory, runs)
            with phase("/proc reads"):
                vmas_by_pid[pid] = layouts[pid].flagged()
            check_supported(pid, vmas_by_pid[pid])
        mm_img = collect_mm(pid, vmas_by_pid[pid], brk, src=src)
        step(f"write core and mm of {pid}")
        core_img["job_stopped"] = any(t.tid in frozen.job_stopped for t in threads)
        imgdir.write("core", core_img)
        imgdir.write("mm", mm_img)
        if not pages_first:
            written += _write_pages(pid, src, mm_img["vmas"], imgdir, memory, runs)
    written += memfd.dump_contents(objects.get(memfd.IMAGE), files_by_src, imgdir)
    written += ghosts.dump_contents(imgdir)
    if posix_timers:
        imgdir.write("timers", {"processes": posix_timers})
    return written


def _write_pages(pid, src, vmas, imgdir, memory, runs):
    """The pages of one process (memory(), or every present page in `runs`) and of the shared
    memory it maps; -> bytes written."""
    step(f"write pages of {pid}")
    if memory is None:
        written = dump_private_memory(pid, vmas, imgdir, runs=runs[pid], src=src)
    else:
        written = memory(pid, vmas, imgdir)
    for vma in shmem_vmas(vmas):
        written += dump_shmem(src, vma, imgdir)
    return written


def collect_cpus(frozen, srcs=None, layouts=None):
    """{pid: _collect_cpu()} of every frozen process. layouts: {pid: Layout} whose smaps walk
    each process's brk() starts (see _collect_cpu)."""
    return {pid: _collect_cpu(pid, threads, srcs[pid] if srcs else reader(pid, threads),
                              layouts[pid] if layouts else None)
            for pid, threads in frozen.processes.items()}


def _collect_cpu(pid, threads, src, layout=None):
    """(core image body, brk, POSIX timers) of one frozen process: its threads' registers,
    then what only the task can say, by injected syscalls (sigactions, itimers, brk, timers).

    brk() takes the mm's lock for writing, which a smaps walk holds for reading: it comes last
    when a walk may be in flight, or, given the Layout whose walk has not started, first, and
    the walk starts as soon as it returned."""
    leftovers.wipe_trampoline(src)        # a killed pycr's trampoline would block the injector
    # Registers before any injection: an injection borrows the registers and the signal mask.
    with phase("registers"):
        states = [collect_thread(t, pid) for t in threads]
    with phase("injections"), Injector(threads[0]) as injector:
        log.info("pid %d: reading sigactions and brk by injected syscalls", pid)
        if layout is not None:
            brk = injector.check(NR["brk"], 0)
            layout.walk()
        core_img = collect_core(pid, states, threads[0], injector)
        timers = collect_posix_timers(pid, src, injector)
        if layout is None:
            brk = injector.check(NR["brk"], 0)
    return core_img, brk, timers


def _read_tree(frozen, srcs, hidden_fds, layouts, pages_first=False):
    """Pass 1 of write_tree_images: read (from /proc, while frozen) what can refuse the dump.
    pages_first: the VMAs as maps lists them; their flags are checked after the pages."""
    processes = frozen.processes
    # Pass 1: read what can refuse the dump, before writing anything.
    check_pid_namespace(processes)
    check_sessions(processes, frozen.zombies)
    pstree = collect_pstree(processes, frozen.zombies)
    vmas_by_pid, files_by_src = {}, {}
    for pid, src in srcs.items():
        # What a pycr killed earlier left goes first: its userfaultfd here (its trampoline went
        # before the injected reads).
        leftovers.close_stray_uffds(src, processes[pid][0], keep=(hidden_fds or {}).get(pid, ()))
        check_paths(pid, src)
        vmas = layouts[pid].mapped if pages_first else layouts[pid].flagged()
        check_supported(pid, vmas)
        vmas_by_pid[pid] = vmas
        files_by_src[src] = _collect_files(src, (hidden_fds or {}).get(pid))
    number_file_descriptions(files_by_src)
    objects = collect_objects(files_by_src)
    vmas_by_src = {srcs[pid]: vmas for pid, vmas in vmas_by_pid.items()}
    memfd.add_mapped(objects, vmas_by_src)
    ghosts = ghost.Ghosts()
    ghosts.add_fds(files_by_src)
    ghosts.add_vmas(vmas_by_src)
    for image, body in ((ghost.IMAGE, ghosts.body()), (sysvshm.IMAGE, sysvshm.collect(vmas_by_src))):
        if body:
            objects[image] = body
    locks = collect_file_locks({pid: (src, files_by_src[src]) for pid, src in srcs.items()})
    check_terminals(pstree, objects)
    log.info("tree of %d processes: VMAs and fds readable, nothing unsupported", len(processes))
    return pstree, vmas_by_pid, files_by_src, objects, ghosts, locks


def dump_tree(root, images_dir, pre_dump=False, leave_running=False, prev_images_dir=None,
              tracker="auto", overwrite=False, stats=None, pages_sink=None):
    """Checkpoint the tree rooted at `root` into images_dir. Returns 0; fills `stats` (a DumpStats).

    pre-dump and --prev-images-dir go through pycr.predump (incremental chains).
    images_dir must not hold another image set unless overwrite (see pycr.outdir);
    a failed dump removes what it wrote. The manifest, written last, seals the set.
    pages_sink: a connected net.page_client.PageServerClient: the pages files go there.
    """
    if pre_dump or prev_images_dir:
        from .predump import dump_incremental
        return dump_incremental(root, images_dir, pre_dump=pre_dump, leave_running=leave_running,
                                prev_images_dir=prev_images_dir, tracker=tracker, overwrite=overwrite,
                                stats=stats, pages_sink=pages_sink)
    stats = stats if stats is not None else DumpStats()
    started = time.monotonic()
    with outdir.writing(images_dir, overwrite, pages_sink) as imgdir, Copier():
        with phase("freeze"):
            frozen = freeze(root, timeout=settings.freeze_timeout())
        frozen_at = time.monotonic()
        stats.processes, stats.threads = len(frozen.processes), sum(len(t) for t in frozen.processes.values())
        log.info("froze %d processes, %d threads with PTRACE_SEIZE + PTRACE_INTERRUPT",
                 stats.processes, stats.threads)
        try:
            layouts = {pid: Layout(reader(pid, threads)).walk()       # the walks run meanwhile
                       for pid, threads in frozen.processes.items()}
            with progress.step("dump"):
                stats.pages_bytes = write_tree_images(frozen, imgdir, warn_pipes=True, layouts=layouts)
            step("write inventory and manifest")
            imgdir.write("inventory", inventory(root, "dump"))
            manifest.seal(imgdir)
            step("release the tree" if leave_running else "kill the tree")
        except BaseException:
            log.info("dump failed: detaching, the tree goes on as before; removing what was written")
            frozen.thaw()
            raise
    # The set is sealed: from here a stop signal undoes nothing. Stopped before the
    # kill, pycr lets the tree go on (the safe side) and says so.
    finish("dump", "the tree goes on")
    stats.frozen_seconds = time.monotonic() - frozen_at
    try:
        step("the set is sealed")
    except KeyboardInterrupt:
        with deferred_signals():
            frozen.thaw()
        raise
    if leave_running:
        with deferred_signals(), phase("release"):
            frozen.thaw()
        stats.frozen_seconds = time.monotonic() - frozen_at      # until every thread runs again
        log.info("detached every thread (--leave-running): the tree goes on")
    else:
        finish("dump", "the tree was killed")
        try:
            with phase("waiting for PIDs to be free"):
                frozen.kill(timeout=settings.freeze_timeout())
            log.info("killed the tree with SIGKILL and waited for its PIDs to be free")
        except PycrError as exc:   # the images are complete; only the PIDs are late
            log.warning("warning: %s", exc)
    stats.total_seconds = time.monotonic() - started
    log.info("dump done: %.1f MiB of pages, frozen %.3f s, total %.3f s",
             stats.pages_bytes / (1 << 20), stats.frozen_seconds, stats.total_seconds)
    return 0
