"""The pycr command itself: check, usage errors, error lines."""

import json

from pycrcmd import one_line_error, pycr


def test_check_reports_every_mechanism_and_trackers():
    proc = pycr("check", "--json")
    doc = json.loads(proc.stdout)
    names = {c["name"]: c["ok"] for c in doc["checks"]}
    for needed in ("ptrace registers", "syscall injection", "process_vm_readv/writev", "clone3 set_tid", "PR_SET_MM_MAP", "pidfd_getfd"):
        assert names[needed], needed
    assert {"soft-dirty", "userfaultfd WP_ASYNC", "PAGEMAP_SCAN"} <= names.keys()
    assert doc["ok"] is True and "hash" in doc["trackers"]
    # The trackers offered follow from the probes.
    assert ("uffd-wp" in doc["trackers"]) == (names["userfaultfd WP_ASYNC"] and names["PAGEMAP_SCAN"])
    assert ("soft-dirty" in doc["trackers"]) == names["soft-dirty"]
    text = pycr("check").stdout
    assert "auto picks" in text and "dump and restore: can work" in text
    # The kernel objects' mechanisms, each tried: its line says what came back.
    objects = {c["name"]: c for c in doc["checks"] if c["needed_for"] == "objects"}
    assert {"sock_diag", "timerfd ticks", "POSIX timer IDs", "ptys", "SysV shm ids"} <= objects.keys()
    assert objects["ptys"]["ok"] and objects["sock_diag"]["ok"], objects
    if objects["timerfd ticks"]["ok"]:
        assert objects["timerfd ticks"]["detail"] == "TFD_IOC_SET_TICKS 3, read 3"
    if objects["POSIX timer IDs"]["ok"]:
        assert objects["POSIX timer IDs"]["detail"] == "asked for timer 4242, got 4242"


def test_usage_errors_are_one_line():
    proc = pycr("dump", "-D", "/tmp/nowhere", expect=2)
    line = one_line_error(proc)
    assert "-t" in line
    proc = pycr("frobnicate", expect=2)
    assert "invalid choice" in one_line_error(proc)


def test_show_of_missing_path_is_one_line(tmp_path):
    proc = pycr("show", tmp_path / "absent", expect=1)
    assert "absent" in one_line_error(proc)


def test_encode_rejects_bad_json(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    proc = pycr("encode", "-i", tmp_path / "bad.json", "-o", tmp_path / "out.img", expect=1)
    assert "not valid JSON" in one_line_error(proc)
    assert not (tmp_path / "out.img").exists()


def test_restore_of_a_file_says_it_is_not_a_directory(tmp_path):
    single = tmp_path / "core-1.img"
    single.write_bytes(b"PYCC")
    line = one_line_error(pycr("restore", "-D", single, "-d", expect=1))
    assert line == (f"pycr: {single}: not a directory (an image set is a directory; "
                    "`pycr show FILE` reads one image)")
    line = one_line_error(pycr("restore", "-D", tmp_path / "none", "-d", expect=1))
    assert line == f"pycr: {tmp_path / 'none'}: no such image directory"


def test_check_of_a_clean_tree_and_of_a_missing_pid(tmp_path):
    import subprocess
    import sys
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert pycr("check", "-t", child.pid).stdout == f"nothing of pycr's in the tree of pid {child.pid}\n"
        assert pycr("cleanup", "-t", child.pid).stdout == f"nothing of pycr's in the tree of pid {child.pid}\n"
    finally:
        child.kill()
        child.wait()
    line = one_line_error(pycr("check", "-t", child.pid, expect=1))
    assert line.startswith(f"pycr: pid {child.pid}: no such process")


def test_restore_follow_gives_up_after_its_timeout(tmp_path):
    """Nothing appears in the directory: one line, a non-zero exit, soon after the timeout."""
    import time
    started = time.monotonic()
    proc = pycr("restore", "-D", tmp_path, "--follow", "--follow-timeout", 1, expect=1, timeout=30)
    took = time.monotonic() - started
    assert one_line_error(proc) == f"pycr: {tmp_path}: no image set to start from appeared within 1 s"
    assert 1.0 <= took < 10.0, took


def test_verbose_dump_explains_its_steps_in_kernel_terms(spawn, tmp_path):
    import re
    import procutil
    w = spawn("counter")
    quiet = pycr("dump", "-t", w.pid, "-D", tmp_path / "quiet", "-R")
    assert quiet.stderr == ""
    lines = pycr("dump", "-t", w.pid, "-D", tmp_path / "img", "-R", "-v").stderr.splitlines()
    assert lines[0] == "pycr: froze 1 processes, 1 threads with PTRACE_SEIZE + PTRACE_INTERRUPT"
    assert f"pycr: pid {w.pid}: reading sigactions and brk by injected syscalls" in lines
    assert any(re.fullmatch(rf"pycr: pid {w.pid}: copying \d+ pages in \d+ runs with process_vm_readv", line)
               for line in lines), lines
    assert "pycr: detached every thread (--leave-running): the tree goes on" in lines
    assert re.fullmatch(r"pycr: dump done: [0-9.]+ MiB of pages, frozen [0-9.]+ s, total [0-9.]+ s", lines[-1])
    procutil.assert_running_untraced(w.pid)


def test_a_tree_that_holds_pycr_and_pids_below_one_are_refused(tmp_path):
    import os
    line = one_line_error(pycr("dump", "-t", 0, "-D", tmp_path / "a", expect=2))
    assert line == "pycr: argument -t/--tree: '0' must be at least 1 (see pycr dump --help)"
    # the test's own process is an ancestor of the pycr it starts
    line = one_line_error(pycr("dump", "-t", os.getpid(), "-D", tmp_path / "b", "-R", expect=1))
    assert line.startswith(f"pycr: the tree of pid {os.getpid()} holds pycr itself (pid ")
    assert not (tmp_path / "b").exists()


def test_encode_into_a_directory_names_it(tmp_path):
    from pycr import images
    from test_formats import sample_inventory
    (tmp_path / "x.json").write_text(images.to_json(sample_inventory(), kind="inventory"))
    line = one_line_error(pycr("encode", "-i", tmp_path / "x.json", "-o", tmp_path, expect=1))
    assert line == f"pycr: {tmp_path}: is a directory: name the image file to write"
