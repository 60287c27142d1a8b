"""pre-dump chains against real processes: a chain of passes reassembles to
exactly the memory of the process at the final dump, through mapping changes,
forks, exits and exec; broken chains are refused in one line."""

import os
import random
import signal

import pytest

import procutil
from kernel import require_tracker
from pycrcmd import one_line_error, pycr
from pycr.dump import dump_tree
from pycr.errors import ImageError
from pycr.images import ImageDir
from pycr.images import read_memory

PAGE = 4096
SPECIAL = ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]")


def private_anon(pid):
    """(start, end) of the private anonymous, readable VMAs of pid (the test's own /proc reading)."""
    return [(s, e) for s, e, perms, path in procutil.maps(pid)
            if perms[3] == "p" and perms[0] == "r" and path in ("", "[heap]", "[stack]")]


def stop_tree(pids):
    """SIGSTOP the processes and, once they are stopped, any child they forked meanwhile."""
    todo = list(pids)
    while True:
        for pid in todo:
            procutil.kill(pid, signal.SIGSTOP)
        assert procutil.wait_until(lambda: all(procutil.state(p) in ("T", None, "Z") for p in todo), 5), \
            "tree did not stop"
        todo = [c for p in pids for c in procutil.descendants(p)
                if procutil.state(c) not in ("T", None, "Z")]
        if not todo:
            return


def cont_tree(pids):
    for pid in pids:
        try:
            procutil.kill(pid, signal.SIGCONT)
        except ValueError:
            pass


def assert_chain_matches(imgdir, pid):
    """Every private anonymous page of the (stopped) process equals what the chain holds."""
    checked = 0
    for start, end in private_anon(pid):
        live = procutil.read_memory(pid, start, end - start)
        chain = read_memory(imgdir, str(pid), start, end - start)
        if live != chain:
            bad = next(i for i in range(0, end - start, PAGE) if live[i:i + PAGE] != chain[i:i + PAGE])
            raise AssertionError(f"pid {pid}: page {start + bad:#x} of VMA {start:#x}-{end:#x} differs from "
                                 f"the chain in {imgdir}: {where(imgdir, pid, start + bad)}")
        checked += end - start
    assert checked > 0


def where(imgdir, pid, addr):
    """Which pagemap entries of the chain cover addr (for failure messages)."""
    out, d = [], ImageDir(imgdir)
    while d is not None:
        if d.exists("pagemap", str(pid)):
            out += [(os.path.basename(d.path), e) for e in d.read("pagemap", str(pid)).entries
                    if e.vaddr <= addr < e.vaddr + e.nr_pages * PAGE]
        d = d.parent()
    return out


def untraced(pids):
    for pid in pids:
        assert procutil.tracer_pid(pid) == 0, f"pid {pid} left traced"


@pytest.mark.parametrize("tracker", ["uffd-wp", "hash"])
def test_three_level_chain_reassembles_memory(spawn, tmp_path, tracker):
    require_tracker(tracker)
    w = spawn("bigmem", 64, "--dirty-pct-per-sec", 20, "--report-ms", 20)
    for n in (1, 2):
        prev = f"../d{n - 1}" if n > 1 else None
        dump_tree(w.pid, tmp_path / f"d{n}", pre_dump=True, prev_images_dir=prev, tracker=tracker)
        untraced([w.pid])
        # Pages written after the pass: two new reports, with a step of writes between them.
        w.wait_for(r"^dirtied \d+$", start=w.mark() + 1)
    stop_tree([w.pid])
    try:
        dump_tree(w.pid, tmp_path / "d3", prev_images_dir="../d2", leave_running=True, tracker=tracker)
        untraced([w.pid])
        inv = ImageDir(tmp_path / "d3").read("inventory")
        assert (str(inv.kind), inv.parent, inv.pass_nr, inv.tracker) == ("dump", "../d2", 2, tracker)
        entries = ImageDir(tmp_path / "d3").read("pagemap", str(w.pid)).entries
        assert any(e.in_parent for e in entries) and any(not e.in_parent for e in entries)
        assert_chain_matches(tmp_path / "d3", w.pid)
    finally:
        cont_tree([w.pid])


def test_mapping_changes_between_passes(spawn, tmp_path):
    w = spawn("mapper", 5)          # mmap, munmap, mremap, mprotect every 5 ms
    for n in (1, 2, 3):
        prev = f"../d{n - 1}" if n > 1 else None
        dump_tree(w.pid, tmp_path / f"d{n}", pre_dump=True, prev_images_dir=prev)
        w.wait_for(r"^step \d+$", start=w.mark() + 39)        # 40 reshaping steps before the next pass
    stop_tree([w.pid])
    try:
        dump_tree(w.pid, tmp_path / "d4", prev_images_dir="../d3", leave_running=True)
        untraced([w.pid])
        assert_chain_matches(tmp_path / "d4", w.pid)
        assert "anon_inode:[userfaultfd]" not in {os.readlink(f"/proc/{w.pid}/fd/{fd}")
                                                  for fd in os.listdir(f"/proc/{w.pid}/fd")}
    finally:
        cont_tree([w.pid])
    w.wait_for(r"^step \d+$", start=w.mark())


def test_new_and_vanished_processes(spawn, tmp_path):
    w = spawn("forker")
    first = set(w.pids())
    dump_tree(w.pid, tmp_path / "d1", pre_dump=True)
    # The workers of d1 exit, and a new one is forked after that.
    for pid in {p.pid for p in ImageDir(tmp_path / "d1").read("pstree").processes} - {w.pid}:
        w.wait_for(rf"^exit {pid} 0$")
    w.wait_for(r"^fork \d+$", start=w.mark())
    dump_tree(w.pid, tmp_path / "d2", pre_dump=True, prev_images_dir="../d1")
    second = {p.pid for p in ImageDir(tmp_path / "d2").read("pstree").processes}
    assert second - first, "a worker forked between the passes must be in the second pass"
    stop_tree([w.pid])
    pids = w.pids()
    try:
        dump_tree(w.pid, tmp_path / "d3", prev_images_dir="../d2", leave_running=True)
        dumped = [p.pid for p in ImageDir(tmp_path / "d3").read("pstree").processes]
        untraced(dumped)
        for pid in dumped:
            assert_chain_matches(tmp_path / "d3", pid)
            fds = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
            assert "anon_inode:[userfaultfd]" not in fds
    finally:
        cont_tree(pids)


def test_exec_between_passes_copies_the_process_whole(spawn, tmp_path):
    w = spawn("execer", 0)
    dump_tree(w.pid, tmp_path / "d1", pre_dump=True)
    start = w.mark()
    w.signal(signal.SIGUSR2)
    w.wait_for(rf"^ready {w.pid}$", start=start)
    dump_tree(w.pid, tmp_path / "d2", pre_dump=True, prev_images_dir="../d1")
    entries = ImageDir(tmp_path / "d2").read("pagemap", str(w.pid)).entries
    assert entries and not any(e.in_parent for e in entries), "after exec nothing may come from the parent"
    stop_tree([w.pid])
    try:
        dump_tree(w.pid, tmp_path / "d3", prev_images_dir="../d2", leave_running=True)
        untraced([w.pid])
        assert_chain_matches(tmp_path / "d3", w.pid)
    finally:
        cont_tree([w.pid])


def test_broken_chains_are_refused(spawn, tmp_path):
    a = spawn("counter")
    b = spawn("counter")
    dump_tree(a.pid, tmp_path / "a1", pre_dump=True, tracker="hash")
    # missing parent
    res = pycr("pre-dump", "-t", a.pid, "-D", tmp_path / "x", "--prev-images-dir", "../nothing", expect=1)
    assert "does not exist" in one_line_error(res)
    # a parent from another tree
    res = pycr("dump", "-t", b.pid, "-D", tmp_path / "b2", "--prev-images-dir", "../a1", "-R", expect=1)
    assert "another tree" in one_line_error(res)
    # a parent that is a final dump
    dump_tree(a.pid, tmp_path / "a2", prev_images_dir="../a1", leave_running=True)
    with pytest.raises(ImageError, match="not a pre-dump"):
        dump_tree(a.pid, tmp_path / "a3", pre_dump=True, prev_images_dir="../a2")
    # a parent whose inventory is gone
    os.unlink(tmp_path / "a1" / "inventory.img")
    with pytest.raises(ImageError, match="missing"):
        dump_tree(a.pid, tmp_path / "a4", pre_dump=True, prev_images_dir="../a1")
    untraced([a.pid, b.pid])
    assert a.alive() and b.alive()


def test_uffd_closed_by_the_target_falls_back_to_a_full_copy(spawn, tmp_path):
    require_tracker("uffd-wp")
    w = spawn("bigmem", 8)
    dump_tree(w.pid, tmp_path / "d1", pre_dump=True, tracker="uffd-wp")
    fd = ImageDir(tmp_path / "d1").read("tracker", w.pid).uffd_fd
    # Close it inside the target, as a program might.
    from pycr.freeze import freeze
    from pycr.ptrace.inject import Injector
    with freeze(w.pid) as frozen, Injector(frozen.processes[w.pid][0]) as inj:
        assert inj.call("close", fd) == 0
    dump_tree(w.pid, tmp_path / "d2", pre_dump=True, prev_images_dir="../d1")
    entries = ImageDir(tmp_path / "d2").read("pagemap", str(w.pid)).entries
    assert entries and not any(e.in_parent for e in entries)
    stop_tree([w.pid])
    try:
        dump_tree(w.pid, tmp_path / "d3", prev_images_dir="../d2", leave_running=True)
        assert_chain_matches(tmp_path / "d3", w.pid)
    finally:
        cont_tree([w.pid])


def test_a_chain_begun_over_an_abandoned_ones_userfaultfd_tracks_from_its_first_pass(spawn, tmp_path):
    """A pycr killed mid-chain (or a chain given up) leaves its userfaultfd in the process, registered
    on the VMAs. A new chain must close it before it registers its own: a VMA takes one userfaultfd
    at a time, so its registration failed, the old one's close then unregistered them, and the new
    chain's second pass copied every page again (a retried migration: 30-300x the downtime)."""
    require_tracker("uffd-wp")
    w = spawn("bigmem", 16)                 # 4096 pages, written once, then left alone
    dump_tree(w.pid, tmp_path / "old", pre_dump=True, tracker="uffd-wp")       # abandoned: its uffd stays
    dump_tree(w.pid, tmp_path / "d1", pre_dump=True, tracker="uffd-wp")
    untraced([w.pid])
    dump_tree(w.pid, tmp_path / "d2", pre_dump=True, prev_images_dir="../d1", tracker="uffd-wp")
    copied = sum(e.nr_pages for e in ImageDir(tmp_path / "d2").read("pagemap", str(w.pid)).entries
                 if not e.in_parent)
    assert copied < 256, f"the second pass copied {copied} pages of an idle process"
    links = procutil.fds(w.pid).values()
    assert sum(1 for link in links if link == "anon_inode:[userfaultfd]") == 1, list(links)


def scribble(pid, base, size, count):
    """Overwrite `count` random pages of [base, base+size) from outside."""
    with open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:
        for _ in range(count):
            mem.seek(base + random.randrange(size // PAGE) * PAGE)
            mem.write(os.urandom(PAGE))


def test_restore_from_a_chain(spawn, tmp_path, cleanup_pids):
    w = spawn("bigmem", 64)
    m = w.wait_for(r"^region ([0-9a-f]+) (\d+)$")
    base, size = int(m.group(1), 16), int(m.group(2))
    pycr("pre-dump", "-t", w.pid, "-D", tmp_path / "d1")
    scribble(w.pid, base, size, 300)
    pycr("pre-dump", "-t", w.pid, "-D", tmp_path / "d2", "--prev-images-dir", "../d1")
    scribble(w.pid, base, size, 100)
    expected = procutil.checksum(procutil.read_memory(w.pid, base, size))
    pycr("dump", "-t", w.pid, "-D", tmp_path / "d3", "--prev-images-dir", "../d2")
    assert procutil.wait_gone([w.pid]) == []
    cleanup_pids.add(w.pid)
    pycr("restore", "-D", tmp_path / "d3", "-d")
    got = w.signal_and_wait(signal.SIGUSR1, r"^sum ([0-9a-f]+)$", timeout=60).group(1)
    assert int(got, 16) == expected



@pytest.mark.parametrize("tracker", ["uffd-wp", "hash"])
def test_failed_pre_dump_leaves_nothing_behind(spawn, small_fs, tracker):
    """A pre-dump that fails once its tracker is set up (the disk is full) takes it out:
    no fd, no mapping, the same blocked mask, and `pycr check -t` finds nothing."""
    from pycrcmd import one_line_error
    if tracker == "uffd-wp":
        require_tracker("uffd-wp")
    w = spawn("bigmem", 32)
    before = w.signal_and_wait(signal.SIGUSR1, r"^sum (\w+)$").group(1)
    state = (procutil.coalesced_maps(w.pid), procutil.fds(w.pid), procutil.status(w.pid)["SigBlk"])
    proc = pycr("pre-dump", "-t", w.pid, "-D", small_fs / "pre", "--tracker", tracker, expect=1)
    assert one_line_error(proc).startswith("pycr: no space left on device")
    procutil.assert_running_untraced(w.pid)
    assert (procutil.coalesced_maps(w.pid), procutil.fds(w.pid), procutil.status(w.pid)["SigBlk"]) == state
    assert pycr("check", "-t", w.pid).stdout == f"nothing of pycr's in the tree of pid {w.pid}\n"
    assert w.signal_and_wait(signal.SIGUSR1, r"^sum (\w+)$").group(1) == before
    assert not os.path.exists(small_fs / "pre")
