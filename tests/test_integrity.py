"""Image sets are whole, their own and trusted before anything is restored from them.

Each test dumps a real workload, damages or edits the set as an accident or a
user could, and checks that `pycr restore` refuses it in one line naming the
file, with no task created: the dumped PIDs stay free and no restore stub is
left. See pycr/manifest.py, pycr/restore/bounds.py, pycr/restore/trust.py.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

import procutil
from pycrcmd import one_line_error, pycr
from test_restore import stub_tasks

from pycr import images, manifest
from pycr.images import ImageDir


def dump(w, imgdir, *extra):
    pycr("dump", "-t", w.pid, "-D", imgdir, *extra)


def counter_dump(spawn, tmp_path, *extra, name="img"):
    w = spawn("counter")
    w.wait_for(r"^count 5$")
    dump(w, tmp_path / name, *extra)
    return w, tmp_path / name


def refused(imgdir, pids, *extra):
    """Restore must fail in one line, leaving every dumped PID free and no stub behind."""
    before = stub_tasks()
    proc = pycr("restore", "-D", imgdir, "-d", *extra, expect=1)
    line = one_line_error(proc)
    assert stub_tasks() == before
    assert [p for p in pids if procutil.exists(p)] == []
    return line


def flip_bit(path, offset, bit=0):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def test_dump_restore_still_works_and_the_counter_goes_on(spawn, tmp_path, cleanup_pids):
    w, img = counter_dump(spawn, tmp_path)
    man = manifest.verify(img)
    listed = {e.name for e in man.files}
    assert {"inventory.img", "pstree.img", f"core-{w.pid}.img", f"pages-{w.pid}.img"} <= listed
    assert not [n for n in os.listdir(img) if n.endswith(".tmp")]
    n = int(w.last("count").split()[1])
    mark = w.mark()
    cleanup_pids.add(w.pid)
    pycr("restore", "-D", img, "-d")
    w.wait_for(rf"^count {n + 5}$", start=mark)
    after = [int(f[-1]) for f in w.fields("count", mark)]
    assert after[0] in (n, n + 1)
    procutil.assert_running_untraced(w.pid)


def test_flipped_bit_in_pages_is_refused(spawn, tmp_path, cleanup_pids):
    w, img = counter_dump(spawn, tmp_path)
    pages = img / f"pages-{w.pid}.img"
    flip_bit(pages, os.path.getsize(pages) // 2 + 123, bit=5)
    line = refused(img, [w.pid])
    assert pages.name in line and "checksum mismatch" in line


@pytest.mark.parametrize("kind", ["inventory", "pstree", "core", "mm", "pagemap", "files", "pipes-data",
                                  "manifest"])
def test_flipped_bit_in_every_image_kind_is_refused(spawn, tmp_path, cleanup_pids, kind):
    w, img = counter_dump(spawn, tmp_path)
    path = ImageDir(img).path_of(kind, w.pid if kind in ("core", "mm", "pagemap") else None)
    flip_bit(path, os.path.getsize(path) - 3, bit=1)
    line = refused(img, [w.pid])
    assert os.path.basename(path) in line


def test_truncated_and_missing_files_are_refused(spawn, tmp_path, cleanup_pids):
    w, img = counter_dump(spawn, tmp_path)
    pages = img / f"pages-{w.pid}.img"
    saved = pages.read_bytes()
    os.truncate(pages, len(saved) - 4096)
    assert "truncated" in refused(img, [w.pid]) and pages.name in refused(img, [w.pid])
    pages.write_bytes(saved)
    os.unlink(img / f"pagemap-{w.pid}.img")
    line = refused(img, [w.pid])
    assert f"pagemap-{w.pid}.img" in line and "missing" in line


def test_set_without_manifest_is_unfinished(spawn, tmp_path, cleanup_pids):
    """What a dump killed before its last write leaves: every file but the manifest."""
    w, img = counter_dump(spawn, tmp_path)
    os.unlink(img / "manifest.img")
    line = refused(img, [w.pid])
    assert "manifest.img" in line and "incomplete" in line


def test_criu_images_are_named_as_criu_s(tmp_path):
    """A criu image set (its files open with criu's magic numbers, criu/include/magic.h) given to
    pycr: restore and show say they are criu's, not that a pycr set is unfinished or foreign."""
    img = tmp_path / "criu-img"
    img.mkdir()
    (img / "inventory.img").write_bytes((0x58313116).to_bytes(4, "little") + bytes(60))
    (img / "pstree.img").write_bytes((0x54564319).to_bytes(4, "little") + bytes(60))
    line = one_line_error(pycr("restore", "-D", img, "-d", expect=1))
    assert line == f"pycr: {img}: criu's images (inventory.img has criu's magic): pycr reads only its own; " \
                   "restore them with criu"
    shown = pycr("show", img / "pstree.img", expect=None)
    assert "a criu image: pycr reads only its own" in shown.stderr + shown.stdout


def _swap_error(path, listed):
    """The one line a restore gives for `path` replaced by another dump's file (the
    manifest lists the one saved at `listed`): the size first, then the checksum."""
    from pycr.checksum import PAGES_CHUNK
    new, old = path.read_bytes(), listed.read_bytes()
    if len(new) != len(old):
        how = "truncated" if len(new) < len(old) else "corrupt"
        return f"pycr: {path}: {how} or edited: {len(new)} bytes, manifest.img says {len(old)}"
    if path.name.startswith("pages-"):
        bad = next(i for i in range(0, len(new), PAGES_CHUNK)
                   if new[i:i + PAGES_CHUNK] != old[i:i + PAGES_CHUNK])
        return (f"pycr: {path}: checksum mismatch in bytes {bad}-{min(bad + PAGES_CHUNK, len(new)) - 1}: "
                f"the pages are corrupt")
    return f"pycr: {path}: checksum mismatch: corrupt, or edited after the dump"


def test_files_of_two_dumps_of_one_process_are_not_mixed(spawn, tmp_path, cleanup_pids):
    w = spawn("counter")
    w.wait_for(r"^count 5$")
    dump(w, tmp_path / "a", "-R")
    w.wait_for(r"^count 20$")
    dump(w, tmp_path / "b")
    a, b = tmp_path / "a", tmp_path / "b"
    swapped = []
    for name in (f"pages-{w.pid}.img", f"core-{w.pid}.img", f"mm-{w.pid}.img", "inventory.img"):
        if (a / name).read_bytes() == (b / name).read_bytes():
            continue        # the same bytes in both dumps (a sleeping task's registers): nothing mixed
        swapped.append(name)
        shutil.copy(a / name, tmp_path / "keep")
        shutil.copy(b / name, a / name)
        line = refused(a, [w.pid])
        assert line == _swap_error(a / name, tmp_path / "keep")
        shutil.copy(tmp_path / "keep", a / name)
    assert f"pages-{w.pid}.img" in swapped and "inventory.img" in swapped
    # The other set's manifest does not match these files either.
    shutil.copy(b / "manifest.img", a / "manifest.img")
    assert "a/" in refused(a, [w.pid])
    # A file of another dump that this manifest does not list.
    shutil.copy(b / f"core-{w.pid}.img", b / "core-1.img")
    assert "core-1.img: not listed in manifest.img" in refused(b, [w.pid])


def test_edited_json_encoded_back_is_refused(spawn, tmp_path, cleanup_pids):
    w, img = counter_dump(spawn, tmp_path)
    core = img / f"core-{w.pid}.img"
    doc = json.loads(pycr("show", core, "--json").stdout)
    doc["body"]["comm"] = "edited"
    (tmp_path / "core.json").write_text(json.dumps(doc))
    pycr("encode", "-i", tmp_path / "core.json", "-o", core)
    line = refused(img, [w.pid])
    assert core.name in line and "edited" in line


def _edit_and_reseal(img, kind, key, edit):
    d = ImageDir(img)
    obj = d.read(kind, key)
    edit(obj)
    d.write(kind, obj, key)
    manifest.reseal(img)         # checksums pass: only the range checks stand


def test_pagemap_address_off_alignment_is_refused(spawn, tmp_path, cleanup_pids):
    w, img = counter_dump(spawn, tmp_path)

    def shift(pm):
        first = pm.entries[0]
        pm.entries[0] = (first.vaddr + 8, first.nr_pages, first.in_parent)
    _edit_and_reseal(img, "pagemap", str(w.pid), shift)
    line = refused(img, [w.pid])
    assert f"pagemap-{w.pid}.img" in line and "not page aligned" in line


def test_vma_above_the_user_address_space_is_refused(spawn, tmp_path, cleanup_pids):
    from pycr.restore.bounds import task_size
    w, img = counter_dump(spawn, tmp_path)

    def move(mm):
        last = [v for v in mm.vmas if str(v.kind) not in ("vsyscall",)][-1]
        last.end = task_size() + 0x1000
    _edit_and_reseal(img, "mm", w.pid, move)
    line = refused(img, [w.pid])
    assert f"mm-{w.pid}.img" in line and "above the user address space" in line


def test_pid_above_pid_max_and_fd_above_nr_open_are_refused(spawn, tmp_path, cleanup_pids):
    w, img = counter_dump(spawn, tmp_path)
    with open("/proc/sys/kernel/pid_max") as f:
        pid_max = int(f.read())

    def big_sid(tree):
        tree.processes[0].sid = pid_max
    _edit_and_reseal(img, "pstree", None, big_sid)
    line = refused(img, [w.pid])
    assert "pstree.img" in line and "pid_max" in line

    def restore_sid(tree):
        tree.processes[0].sid = w.pid
    _edit_and_reseal(img, "pstree", None, restore_sid)

    def big_fd(files):
        files.processes[0].fds[-1].fd = 1 << 30
    _edit_and_reseal(img, "files", None, big_fd)
    line = refused(img, [w.pid])
    assert "files.img" in line and "nr_open" in line


def test_dump_into_a_set_refuses_and_overwrite_replaces_it(spawn, tmp_path, cleanup_pids):
    w, img = counter_dump(spawn, tmp_path, "-R")
    before = (img / "manifest.img").read_bytes()
    line = one_line_error(pycr("dump", "-t", w.pid, "-D", img, expect=1))
    assert str(img) in line and "holds an image set" in line and "--overwrite" in line
    assert (img / "manifest.img").read_bytes() == before
    procutil.assert_running_untraced(w.pid)
    dump(w, img, "--overwrite")
    assert manifest.verify(img).set_id != images.parse(before, "manifest").set_id
    cleanup_pids.add(w.pid)
    mark = w.mark()
    pycr("restore", "-D", img, "-d")
    w.wait_for(r"^count \d+$", start=mark)


@pytest.mark.time_limit(180)
def test_dump_killed_midway_leaves_nothing_restorable(spawn, tmp_path, cleanup_pids):
    w = spawn("bigmem", 128)
    w.wait_for(r"^ready")
    before = w.signal_and_wait(signal.SIGUSR1, r"^sum (\w+)$").group(1)
    img = tmp_path / "img"
    dumper = subprocess.Popen([sys.executable, "-m", "pycr", "dump", "-t", str(w.pid), "-D", str(img)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Killed as soon as it writes pages (polled often: 128 MiB go by in tens of ms).
        def pages():
            return img.is_dir() and any(n.startswith(".pages-") for n in os.listdir(img))
        procutil.wait_until(lambda: pages() or dumper.poll() is not None, 60, 0.002)
        assert pages(), "the dump never wrote pages"
    finally:
        os.kill(dumper.pid, signal.SIGKILL)
        dumper.wait()
    assert [n for n in os.listdir(img) if n.endswith(".tmp")]
    assert not (img / "manifest.img").exists()
    # Never restorable (whether the tree outlived its tracer or not).
    line = one_line_error(pycr("restore", "-D", img, "-d", expect=1))
    assert "manifest.img" in line and "incomplete" in line
    # The tree outlived its tracer, untouched.
    procutil.assert_running_untraced(w.pid)
    assert w.signal_and_wait(signal.SIGUSR1, r"^sum (\w+)$").group(1) == before
    # The next dump into it says what to do, and --overwrite clears it all, temp files included.
    line = one_line_error(pycr("dump", "-t", w.pid, "-D", img, expect=1))
    assert "unfinished dump" in line and "--overwrite" in line
    dump(w, img, "--overwrite")
    assert not [n for n in os.listdir(img) if n.endswith(".tmp")]
    cleanup_pids.add(w.pid)
    pycr("restore", "-D", img, "-d")
    assert w.signal_and_wait(signal.SIGUSR1, r"^sum (\w+)$").group(1) == before


def test_chain_parent_must_be_the_recorded_pass(spawn, tmp_path, cleanup_pids):
    w = spawn("counter")
    w.wait_for(r"^count 5$")
    pycr("pre-dump", "-t", w.pid, "-D", tmp_path / "d1", "--tracker", "hash")
    pycr("pre-dump", "-t", w.pid, "-D", tmp_path / "d2", "--prev-images-dir", "../d1")
    pycr("pre-dump", "-t", w.pid, "-D", tmp_path / "x2", "--prev-images-dir", "../d1")
    pycr("dump", "-t", w.pid, "-D", tmp_path / "d3", "--prev-images-dir", "../d2")
    os.rename(tmp_path / "d2", tmp_path / "real-d2")
    os.rename(tmp_path / "x2", tmp_path / "d2")
    line = refused(tmp_path / "d3", [w.pid])
    assert "d2" in line and "is not the parent" in line
    os.rename(tmp_path / "d2", tmp_path / "x2")
    os.rename(tmp_path / "real-d2", tmp_path / "d2")
    # A flipped bit in the first pass's pages is found from the final dump.
    pages = tmp_path / "d1" / f"pages-{w.pid}.img"
    flip_bit(pages, 100)
    line = refused(tmp_path / "d3", [w.pid])
    assert str(pages) in line and "checksum mismatch" in line
    flip_bit(pages, 100)
    cleanup_pids.add(w.pid)
    mark = w.mark()
    pycr("restore", "-D", tmp_path / "d3", "-d")
    w.wait_for(r"^count \d+$", start=mark)


# ---------------------------------------------------------------- trust

def test_images_others_may_write_are_refused_unless_trusted(spawn, tmp_path, cleanup_pids):
    w, img = counter_dump(spawn, tmp_path)
    os.chmod(img / f"core-{w.pid}.img", 0o620)
    line = refused(img, [w.pid])
    assert f"core-{w.pid}.img" in line and "writable by group" in line and "--trust-images" in line
    os.chmod(img / f"core-{w.pid}.img", 0o600)
    os.chmod(img, 0o757)
    line = refused(img, [w.pid])
    assert str(img) in line and "writable by others" in line
    cleanup_pids.add(w.pid)
    mark = w.mark()
    pycr("restore", "-D", img, "-d", "--trust-images")
    w.wait_for(r"^count \d+$", start=mark)


NOBODY = 65534


@pytest.fixture
def nobody_counter(workloads, cleanup_pids):
    """A counter running as nobody, from a place nobody can read, with nothing of root's open.

    Yields (pid, status path); a thread reaps it whenever it exits.
    """
    place = f"/tmp/pycr-trust-{os.getpid()}-{time.monotonic_ns()}"
    os.mkdir(place, 0o755)
    exe = os.path.join(place, "counter")
    shutil.copy(workloads["counter"], exe)
    os.chmod(exe, 0o755)
    status = os.path.join(place, "status")
    open(status, "w").close()
    os.chown(status, NOBODY, NOBODY)
    proc = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", exe, status],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd="/", start_new_session=True, close_fds=True)
    threading.Thread(target=proc.wait, daemon=True).start()
    cleanup_pids.add(proc.pid)
    assert procutil.wait_until(lambda: "count 5\n" in open(status).read()), "the nobody counter did not start"
    try:
        yield proc.pid, status
    finally:
        shutil.rmtree(place, ignore_errors=True)


def _chown_set(img, uid):
    os.chown(img, uid, uid)
    for name in os.listdir(img):
        os.chown(img / name, uid, uid)


def _counts(status):
    return [int(line.split()[1]) for line in open(status).read().splitlines() if line.startswith("count ")]


def test_images_of_a_user_restore_only_with_that_users_rights(nobody_counter, tmp_path, cleanup_pids):
    pid, status = nobody_counter
    img = tmp_path / "img"
    pycr("dump", "-t", pid, "-D", img)
    cleanup_pids.add(pid)           # free now: whatever holds it at teardown is the restored counter
    _chown_set(img, NOBODY)
    line = refused(img, [pid])
    assert "owned by uid 65534" in line and "--trust-images" in line

    # The owner rewrites its images: root's uid and every capability, a root-only file open read-write.
    backup = tmp_path / "backup"
    shutil.copytree(img, backup)
    d = ImageDir(img)
    core = d.read("core", pid)
    core.creds.uid = core.creds.euid = core.creds.suid = core.creds.fsuid = 0
    core.creds.cap_prm = core.creds.cap_eff = (1 << 41) - 1
    d.write("core", core, pid)
    manifest.reseal(img)
    _chown_set(img, NOBODY)
    line = refused(img, [pid], "--trust-images")
    assert f"core-{pid}.img" in line and "uid [0]" in line and "65534" in line

    shutil.rmtree(img)
    shutil.copytree(backup, img)
    secret = tmp_path / "secret"
    secret.write_text("root only\n")
    os.chmod(secret, 0o600)
    files = d.read("files")
    fd = next(f for f in files.processes[0].fds if str(f.type) == "reg")
    fd.path, fd.flags, fd.size, fd.pos = str(secret), os.O_RDWR, 10, 0
    d.write("files", files)
    manifest.reseal(img)
    _chown_set(img, NOBODY)
    line = refused(img, [pid], "--trust-images")
    assert "files.img" in line and str(secret) in line and "may not rw" in line

    # The genuine images of nobody's counter come back with --trust-images, as nobody.
    shutil.rmtree(img)
    shutil.copytree(backup, img)
    _chown_set(img, NOBODY)
    n = _counts(status)[-1]
    pycr("restore", "-D", img, "-d", "--trust-images")
    assert procutil.wait_until(lambda: [c for c in _counts(status) if c >= n + 5]), \
        "the restored counter does not count"
    assert procutil.status(pid)["Uid"].split() == [str(NOBODY)] * 4
    assert procutil.status(pid)["CapEff"] == "0" * 16


def test_pages_sums_read_in_pieces_and_threads_are_the_sums_of_the_chunks(tmp_path, monkeypatch):
    """The restore's check cuts pages files into pieces read by several threads (small sets: read
    in one): the sums
    must be those of the file's chunks in order, the short last chunk and files of one
    piece, several pieces and none included, and a byte changed must change its chunk's."""
    from pycr import checksum
    from pycr.native.core import crc32c
    monkeypatch.setattr(checksum, "VERIFY_PIECE", 3 * 8192)        # pieces of 3 chunks of 8 KiB
    monkeypatch.setattr(checksum, "VERIFY_READ", 4096)
    checksum._buffers.__dict__.clear()
    chunk = 8192
    sizes = [0, 4096, 8192 * 7 + 4096, 8192 * 6]
    paths, datas = [], []
    for i, size in enumerate(sizes):
        data = os.urandom(size)
        (tmp_path / f"p{i}").write_bytes(data)
        paths.append(str(tmp_path / f"p{i}"))
        datas.append(data)
    want = [[crc32c(d[at:at + chunk]) for at in range(0, len(d), chunk)] for d in datas]
    for small in (0, 1 << 20):      # pieces in threads through O_DIRECT; all in one thread through the cache
        monkeypatch.setattr(checksum, "VERIFY_SMALL", small)
        for threads in (1, 2, 4):
            assert [list(s) for s in checksum.sums_of_files(paths, chunk, threads)] == want
    assert list(checksum.pages_sums(paths[2], chunk)) == want[2]
    bad = bytearray(datas[2])
    bad[8192 * 4 + 5] ^= 1
    (tmp_path / "p2").write_bytes(bad)
    got = list(checksum.pages_sums(paths[2], chunk))
    assert [i for i in range(len(got)) if got[i] != want[2][i]] == [4]
    checksum._buffers.__dict__.clear()
