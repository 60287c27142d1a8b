"""Dirty-page trackers against real processes: each pass holds exactly the
pages written (uffd-wp) or changed (hash) since its parent, and soft-dirty is
refused where the kernel lacks it."""

import os
from array import array

import pytest

import procutil
from kernel import require_tracker
from pycrcmd import one_line_error, pycr
from pycr.dump import dump_tree
from pycr.images import ImageDir
from pycr.trackers import runs as R

PAGE = 4096


def region(w):
    addr, size = w.wait_for(r"^region ([0-9a-f]+) (\d+)$").groups()
    return int(addr, 16), int(size)


def page_sets(imgdir, pid, lo, hi):
    """(saved pages, in_parent pages) of pid within [lo, hi), as sets of addresses."""
    saved, parent = set(), set()
    for e in ImageDir(imgdir).read("pagemap", str(pid)).entries:
        for k in range(e.nr_pages):
            addr = e.vaddr + k * PAGE
            if lo <= addr < hi:
                (parent if e.in_parent else saved).add(addr)
    return saved, parent


def write_pages(pid, addrs, data_for):
    """Write into the target from outside (the kernel reports tracer writes too)."""
    with open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:
        for addr in addrs:
            mem.seek(addr)
            mem.write(data_for(addr))


def read_page(pid, addr):
    return procutil.read_memory(pid, addr, PAGE)


def untraced(pid):
    assert procutil.tracer_pid(pid) == 0
    assert procutil.state(pid) not in ("t", "T", "Z", None)


def fd_table(pid):
    return {fd: os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}


def test_uffd_wp_pass_holds_exactly_the_written_pages(spawn, tmp_path):
    require_tracker("uffd-wp")
    w = spawn("bigmem", 32)
    base, size = region(w)
    fds_before, maps_before = fd_table(w.pid), procutil.maps(w.pid)
    d1, d2, d3 = tmp_path / "d1", tmp_path / "d2", tmp_path / "d3"
    dump_tree(w.pid, d1, pre_dump=True, tracker="uffd-wp")
    untraced(w.pid)
    saved, parent = page_sets(d1, w.pid, base, base + size)
    assert len(saved) == size // PAGE and not parent, "the first pass copies every page"

    written = [base + i * PAGE for i in (0, 3, 4, 5, 100, 2047, size // PAGE - 1)]
    write_pages(w.pid, written, lambda a: os.urandom(64))
    dump_tree(w.pid, d2, pre_dump=True, prev_images_dir="../d1", tracker="uffd-wp")
    untraced(w.pid)
    saved, parent = page_sets(d2, w.pid, base, base + size)
    assert saved == set(written)
    assert parent == {base + i * PAGE for i in range(size // PAGE)} - set(written)
    assert ImageDir(d2).read("inventory").pass_nr == 1

    again = [base + 7 * PAGE]
    write_pages(w.pid, again, lambda a: b"x" * 8)
    dump_tree(w.pid, d3, prev_images_dir="../d2", leave_running=True)
    untraced(w.pid)
    saved, _ = page_sets(d3, w.pid, base, base + size)
    assert saved == set(again)
    assert fd_table(w.pid) == fds_before, "the userfaultfd must be gone after the final dump"
    assert procutil.maps(w.pid) == maps_before
    with open(f"/proc/{w.pid}/smaps") as f:
        assert " uw" not in f.read(), "no VMA may stay registered"


def test_pre_dump_keeps_tracking_fd_out_of_files_image(spawn, tmp_path):
    require_tracker("uffd-wp")
    w = spawn("counter")
    dump_tree(w.pid, tmp_path / "d1", pre_dump=True, tracker="uffd-wp")
    links = fd_table(w.pid)
    uffds = [fd for fd, link in links.items() if link == "anon_inode:[userfaultfd]"]
    assert len(uffds) == 1 and int(uffds[0]) > 3
    files = ImageDir(tmp_path / "d1").read("files")
    dumped = {f.fd for p in files.processes for f in p.fds}
    assert dumped == {int(fd) for fd in links} - {int(uffds[0])}
    state = ImageDir(tmp_path / "d1").read("tracker", w.pid)
    assert state.uffd_fd == int(uffds[0]) and state.tracker == "uffd-wp"
    dump_tree(w.pid, tmp_path / "d2", prev_images_dir="../d1", leave_running=True)
    assert "anon_inode:[userfaultfd]" not in fd_table(w.pid).values()


def test_hash_pass_holds_exactly_the_changed_pages(spawn, tmp_path):
    w = spawn("bigmem", 16)
    base, size = region(w)
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    dump_tree(w.pid, d1, pre_dump=True, tracker="hash")
    same = [base + i * PAGE for i in (1, 2, 50)]
    changed = [base + i * PAGE for i in (0, 9, 1000, size // PAGE - 1)]
    write_pages(w.pid, same, lambda a: read_page(w.pid, a))        # same bytes again
    write_pages(w.pid, changed, lambda a: os.urandom(16))
    dump_tree(w.pid, d2, pre_dump=True, prev_images_dir=str(d1), tracker="hash")
    untraced(w.pid)
    saved, parent = page_sets(d2, w.pid, base, base + size)
    assert saved == set(changed)
    assert set(same) <= parent
    assert ImageDir(d2).read("inventory").parent == "../d1"
    assert procutil.tracer_pid(w.pid) == 0
    assert "anon_inode:[userfaultfd]" not in fd_table(w.pid).values(), "hash leaves nothing in the target"


def test_soft_dirty_is_refused_in_one_line_where_missing(spawn, tmp_path):
    from pycr.check import check_soft_dirty
    if check_soft_dirty().ok:
        pytest.skip(f"this kernel has soft-dirty (pycr check: {check_soft_dirty().detail})")
    w = spawn("counter")
    res = pycr("pre-dump", "-t", w.pid, "-D", tmp_path / "d", "--tracker", "soft-dirty", expect=1)
    line = one_line_error(res)
    assert "soft-dirty" in line and "not available" in line
    untraced(w.pid)
    assert not (tmp_path / "d" / "inventory.img").exists()


def test_tracker_of_the_parent_must_match(spawn, tmp_path):
    w = spawn("counter")
    dump_tree(w.pid, tmp_path / "d1", pre_dump=True, tracker="hash")
    res = pycr("pre-dump", "-t", w.pid, "-D", tmp_path / "d2", "--prev-images-dir", "../d1",
               "--tracker", "uffd-wp", expect=1)
    assert "--tracker hash" in one_line_error(res)
    untraced(w.pid)
    # auto follows the parent
    pycr("pre-dump", "-t", w.pid, "-D", tmp_path / "d2", "--prev-images-dir", "../d1")
    assert ImageDir(tmp_path / "d2").read("inventory").tracker == "hash"


def test_run_set_operations():
    a = array("Q", [0, 4 * PAGE, 8 * PAGE, 2 * PAGE])
    b = array("Q", [2 * PAGE, 7 * PAGE])
    assert R.pairs(R.intersect(a, b)) == [(2 * PAGE, 4 * PAGE), (8 * PAGE, 9 * PAGE)]
    assert R.pairs(R.subtract(a, b)) == [(0, 2 * PAGE), (9 * PAGE, 10 * PAGE)]
    assert R.pairs(R.union(a, b)) == [(0, 10 * PAGE)]
    assert R.covers(a, PAGE, 3 * PAGE) and not R.covers(a, 3 * PAGE, 9 * PAGE)


def test_untouched_memory_is_not_saved_once_armed(spawn, tmp_path):
    """Write-protecting a never-touched page leaves a marker that pagemap shows as
    "swapped"; on a machine without swap it holds nothing and must not be saved.
    The 4 thread stacks (8 MiB each, barely touched) would otherwise be thousands of pages."""
    require_tracker("uffd-wp")
    w = spawn("threads")
    dump_tree(w.pid, tmp_path / "d1", pre_dump=True, tracker="uffd-wp")
    dump_tree(w.pid, tmp_path / "d2", pre_dump=True, prev_images_dir="../d1", tracker="uffd-wp")
    dump_tree(w.pid, tmp_path / "d3", prev_images_dir="../d2", leave_running=True)
    st = procutil.status(w.pid)
    rss_pages = (int(st["VmRSS"].split()[0]) + int(st["VmSwap"].split()[0])) // 4   # resident or swapped
    for d in ("d1", "d2", "d3"):
        entries = ImageDir(tmp_path / d).read("pagemap", str(w.pid)).entries
        listed = sum(e.nr_pages for e in entries)
        assert listed <= rss_pages, f"{d} lists {listed} pages, the process has {rss_pages} resident or swapped"
