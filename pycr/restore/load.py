"""Reading and checking every image of a dump before the first task is created.

A restore that fails half way has to kill what it made, so everything that can
be known wrong from the images alone (missing, truncated, corrupt or
inconsistent files) is found here, and raises ImageError naming the file.
"""

import bisect
import os
from dataclasses import dataclass, field

from pycr import manifest
from pycr.errors import ImageError
from pycr.images import ImageDir, iter_page_runs, not_a_directory
from pycr.restore import bounds, file_locks, ghost, kinds, memfd, sysvshm, timers, trust
from pycr.restore.memory import PageChain
from pycr.sysinfo import page_size
from pycr.ptrace import xstate as X

PAGE = page_size()
SPECIAL_KINDS = ("vdso", "vvar", "vvar_vclock", "vsyscall")


@dataclass
class ProcessImages:
    """Everything the images say about one process."""
    pid: int
    ppid: int
    pgid: int
    sid: int
    tids: list
    core: object
    mm: object
    fds: list = field(default_factory=list)
    leader_exited: bool = False     # a zombie leader: tids are its live threads only
    leader_exit_code: int = 0
    shares_files: bool = False      # one fd table with its parent (CLONE_FILES)
    posix_timers: list = field(default_factory=list)    # timers.img entries, by ID
    file_locks: list = field(default_factory=list)      # file-locks.img entries it takes again

    @property
    def clone_tids(self):
        """The threads to clone inside the leader (every tid but the leader's)."""
        return [t for t in self.tids if t != self.pid]


@dataclass
class ZombieImage:
    """A dead child its parent had not reaped: restored as a task that exits with `exit_code`."""
    pid: int
    ppid: int
    pgid: int
    sid: int
    exit_code: int
    comm: str = ""


@dataclass
class ImageSet:
    """A whole dump: processes parents first, shared objects, pipes, page sources."""
    imgdir: ImageDir
    inventory: object
    processes: list                  # [ProcessImages], parents before children
    pipes_data: dict                 # pipe_id -> bytes
    shmem: dict                      # shmem_id -> size in bytes the mappings need
    pages: PageChain
    pipe_sizes: dict = field(default_factory=dict)    # pipe_id -> capacity in bytes
    zombies: list = field(default_factory=list)     # [ZombieImage]
    objects: dict = field(default_factory=dict)     # image kind -> body (sockets, event fds...: restore/kinds.py)
    made: dict = field(default_factory=dict)        # what pycr makes once for fds and mappings alike (memfds,
                                                    # ghost files, SysV segments): module name -> its holder

    def holder(self, name, make):
        """The one make(self) of this restore, kept in made[name]: what fds and mappings share
        (memfds, ghost files, SysV segments) is made once, by whichever needs it first."""
        if name not in self.made:
            self.made[name] = make(self)
        return self.made[name]

    @property
    def root(self):
        return self.processes[0]

    @property
    def cpu_layout(self):
        """The XSAVE layout of the CPU the threads' xstate was read on."""
        return X.layout_of_record(self.inventory.cpu)

    def by_pid(self, pid):
        for p in self.processes:
            if p.pid == pid:
                return p
        return None


def _check_pages_file(imgdir, owner, pagemap, arriving=None):
    """pages-<owner>.img must hold exactly the pages its pagemap puts there (arriving: name ->
    size manifest.img lists, of pages files still on their way)."""
    need = sum(n for _, n, in_parent, _ in iter_page_runs(pagemap) if not in_parent) * PAGE
    path = imgdir.pages_path(owner)
    try:
        name = os.path.basename(path)
        have = arriving[name] if arriving and name in arriving else os.stat(path).st_size
    except FileNotFoundError:
        if need == 0:
            return
        raise ImageError(path, "missing") from None
    if have < need:
        raise ImageError(path, f"truncated: {have} bytes, its pagemap needs {need}")
    if have > need:
        raise ImageError(path, f"corrupt: {have} bytes, its pagemap accounts for {need}")


def _check_mm(path, mm, pagemap):
    """VMAs in range (bounds.check_mm); every saved page inside a VMA."""
    bounds.check_mm(path, mm)
    starts = [v.start for v in mm.vmas]
    for vaddr, nr, _, _ in iter_page_runs(pagemap):
        i = bisect.bisect_right(starts, vaddr) - 1
        end = vaddr + nr * PAGE
        # A run may span adjacent VMAs (e.g. an mprotect split); walk them.
        addr = vaddr
        while addr < end:
            if i < 0 or i >= len(mm.vmas) or not (mm.vmas[i].start <= addr < mm.vmas[i].end):
                raise ImageError(path, f"corrupt: saved pages at {addr:#x} lie outside every VMA")
            addr = mm.vmas[i].end
            i += 1


def _pages_of(size):
    return (size + PAGE - 1) // PAGE * PAGE


def _read_shared(imgdir, objects, fds_by_pid, processes, shmem):
    """memfd, ghost and sysvshm images: read also when only mappings need them; every object
    they list gets a size in `shmem` (its pages file is checked against it)."""
    for image in ("memfd", "ghost", "sysvshm"):
        if image not in objects and imgdir.exists(image):
            objects[image] = imgdir.read(image)
    if "memfd" in objects:
        memfd.check(imgdir.path_of("memfd"), objects["memfd"], [])
        for e in objects["memfd"].memfds:
            shmem[e.shmem_id] = max(shmem.get(e.shmem_id, 0), e.size)
    ghost.check(imgdir.path_of("ghost"), objects.get("ghost"), fds_by_pid, processes)
    sysvshm.check(imgdir.path_of("sysvshm"), objects.get("sysvshm"), processes)
    for s in objects["sysvshm"].segments if "sysvshm" in objects else ():
        shmem[s.shmid] = max(shmem.get(s.shmid, 0), s.size)
    mapped_memfds = {v.shmem_id for p in processes for v in p.mm.vmas if v.path.startswith("/memfd:")}
    listed = {e.shmem_id for e in objects["memfd"].memfds} if "memfd" in objects else set()
    if mapped_memfds - listed:
        raise ImageError(imgdir.path_of("memfd"), f"missing or corrupt: memfd {min(mapped_memfds - listed)} "
                                                  "is mapped but not listed")


def _load_timers_and_locks(imgdir, processes):
    """timers.img and file-locks.img, if the set has them, checked and handed to their processes."""
    by_pid = {p.pid: p for p in processes}
    if imgdir.exists("timers"):
        body = imgdir.read("timers")
        timers.check_posix_timers(imgdir.path_of("timers"), body, processes)
        for entry in body.processes:
            by_pid[entry.pid].posix_timers = sorted(entry.timers, key=lambda t: t.id)
    if imgdir.exists("file-locks"):
        body = imgdir.read("file-locks")
        file_locks.check(imgdir.path_of("file-locks"), body, processes)
        for lock in body.locks:
            by_pid[lock.pid].file_locks.append(lock)


def check_set(imgdir, resolve_chain=True, trust_images=False, arriving=()):
    """Before reading anything: who may have written the set, and is it whole and its own?

    Returns (the non-root user who owns the images, or None: the tree is then
    bounded by what that user could have; the set's manifest). See pycr.manifest
    and pycr.restore.trust. arriving: pages files still on their way (manifest.verify).
    """
    if not trust_images:
        trust.check_modes([imgdir.path])
    chain = manifest.verify_chain(imgdir.path, deep=True, parents=resolve_chain, arriving=arriving)
    dirs = [d for d, _ in chain]
    if not trust_images:
        trust.check_modes(dirs[1:])
    return trust.owner_of(dirs), chain[0][1]


def load_images(images_dir, allow_pre_dump=False, resolve_chain=True, trust_images=False, allow_lazy=False,
                arriving=()):
    """Load and cross-check every image of the dump in images_dir -> ImageSet.

    First check_set (owners and modes, manifest and checksums of the set and
    its chain), then every value against this kernel's limits (bounds).
    allow_pre_dump: accept a pre-dump too (incremental restore builds a
    replica from every pass of a chain, not only from the final dump).
    resolve_chain=False skips following every in_parent run up the chain
    (incremental restore: the replica holds those pages already, and the
    runs it does follow raise ImageError then if the chain is broken); the
    parent's set ID is still checked, its files were when it was applied.
    trust_images: accept images others own or may write (--trust-images).
    allow_lazy: accept a lazy dump (restore --lazy-pages: its anonymous pages come from its source).
    arriving: names of the set's pages files still on their way (pycr serve writes them into the
    replica as they come, each chunk checked against the manifest: pycr.migrate.stream); every
    other file is checked here, and these files' sizes are taken from the manifest.
    """
    imgdir = ImageDir(images_dir)
    if not os.path.isdir(imgdir.path):
        raise ImageError(imgdir.path, not_a_directory(imgdir.path))
    owner, man = check_set(imgdir, resolve_chain, trust_images, arriving)
    sizes = {e.name: e.size for e in man.files if e.name in arriving}
    inventory = imgdir.read("inventory")
    if str(inventory.kind) == "lazy-dump" and not allow_lazy:
        raise ImageError(imgdir.path_of("inventory"), "a lazy dump (dump --lazy-pages): its anonymous pages are "
                         "at its source; restore it with --lazy-pages and `pycr lazy-pages --page-server`")
    if str(inventory.kind) not in ("dump", "lazy-dump") and not (allow_pre_dump and str(inventory.kind) == "pre-dump"):
        raise ImageError(imgdir.path_of("inventory"),
                         f"a {inventory.kind} cannot be restored; restore the final dump of the chain")
    if inventory.page_size != PAGE:
        raise ImageError(imgdir.path_of("inventory"), f"page size {inventory.page_size} is not {PAGE}")
    pstree = imgdir.read("pstree")
    if not pstree.processes:
        raise ImageError(imgdir.path_of("pstree"), "corrupt: no processes")
    bounds.check_tree(imgdir.path_of("pstree"), pstree)
    if pstree.processes[0].pid != inventory.root_pid:
        raise ImageError(imgdir.path_of("pstree"),
                         f"corrupt: first process {pstree.processes[0].pid} is not the root "
                         f"{inventory.root_pid} of inventory.img")
    files = imgdir.read("files")
    fds_by_pid = {p.pid: list(p.fds) for p in files.processes}
    pipes = imgdir.read("pipes-data")
    pipes_data = {p.pipe_id: bytes(p.data) for p in pipes.pipes}
    pipe_sizes = {p.pipe_id: p.size for p in pipes.pipes}
    chain = PageChain(imgdir)

    processes, seen = [], set()
    shmem = {}
    for entry in pstree.processes:
        pid = entry.pid
        if pid in seen:
            raise ImageError(imgdir.path_of("pstree"), f"corrupt: pid {pid} listed twice")
        if pid != inventory.root_pid and entry.ppid not in seen:
            raise ImageError(imgdir.path_of("pstree"),
                             f"corrupt: pid {pid} comes before its parent {entry.ppid}")
        seen.add(pid)
        tids = list(entry.threads)
        exited = bool(entry.leader_exited)
        if not tids or (tids[0] != pid) != exited or (exited and pid in tids):
            raise ImageError(imgdir.path_of("pstree"), f"corrupt: pid {pid} does not lead its threads")
        if entry.shares_files and pid == inventory.root_pid:
            raise ImageError(imgdir.path_of("pstree"), "corrupt: the root shares its parent's fd table")
        core = imgdir.read("core", pid)
        if core.pid != pid or [t.tid for t in core.threads] != tids:
            raise ImageError(imgdir.path_of("core", pid), "corrupt: its pid or threads differ from pstree.img")
        mm = imgdir.read("mm", pid)
        if mm.pid != pid:
            raise ImageError(imgdir.path_of("mm", pid), f"corrupt: it describes pid {mm.pid}")
        bounds.check_fds(imgdir.path_of("files"), pid, fds_by_pid.get(pid, []), core)
        timers.check_itimers(imgdir.path_of("core", pid), core)
        pagemap = chain.pagemap(0, str(pid))
        _check_pages_file(imgdir, str(pid), pagemap, sizes)
        _check_mm(imgdir.path_of("mm", pid), mm, pagemap)
        if resolve_chain:
            chain.check_resolvable(str(pid))
        for vma in mm.vmas:
            if str(vma.kind) == "shmem" or vma.path.startswith("/memfd:"):
                need = vma.pgoff + (vma.end - vma.start)
                shmem[vma.shmem_id] = max(shmem.get(vma.shmem_id, 0), need)
        processes.append(ProcessImages(pid=pid, ppid=entry.ppid, pgid=entry.pgid, sid=entry.sid,
                                       tids=tids, core=core, mm=mm, fds=fds_by_pid.get(pid, []),
                                       leader_exited=exited, leader_exit_code=entry.leader_exit_code,
                                       shares_files=bool(entry.shares_files)))
    zombies = []
    for z in pstree.zombies:
        if z.pid in seen or z.ppid not in seen or z.pid in {t for p in processes for t in p.tids}:
            raise ImageError(imgdir.path_of("pstree"),
                             f"corrupt: zombie {z.pid} is listed twice or its parent {z.ppid} is not in the tree")
        seen.add(z.pid)
        zombies.append(ZombieImage(pid=z.pid, ppid=z.ppid, pgid=z.pgid, sid=z.sid, exit_code=z.exit_code,
                                  comm=z.comm))
    objects = kinds.check_all(imgdir, fds_by_pid)
    _read_shared(imgdir, objects, fds_by_pid, processes, shmem)
    for shmem_id, size in shmem.items():
        key = f"shmem-{shmem_id}"
        pagemap = chain.pagemap(0, key)
        bounds.check_runs(imgdir.path_of("pagemap", key), pagemap, limit=_pages_of(size))
        _check_pages_file(imgdir, key, pagemap)
        if resolve_chain:
            chain.check_resolvable(key)
    for pid_fds in fds_by_pid:
        if pid_fds not in seen or any(z.pid == pid_fds for z in zombies):
            raise ImageError(imgdir.path_of("files"), f"corrupt: fds of pid {pid_fds}, not in pstree.img")
    for g in objects["ghost"].ghosts if "ghost" in objects else ():
        key = ghost.owner(g.ghost_id)
        pagemap = chain.pagemap(0, key)
        bounds.check_runs(imgdir.path_of("pagemap", key), pagemap, limit=_pages_of(g.size))
        _check_pages_file(imgdir, key, pagemap)
    _load_timers_and_locks(imgdir, processes)
    images = ImageSet(imgdir=imgdir, inventory=inventory, processes=processes,
                      pipes_data=pipes_data, shmem=shmem, pages=chain, pipe_sizes=pipe_sizes,
                      zombies=zombies, objects=objects)
    if owner is not None:
        trust.check_owner_bound(images, owner)
    return images
