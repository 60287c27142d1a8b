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
    assert line == (f"pycr: pid {os.getpid()} is this pycr's own ancestor (pycr is pid {pid_of_pycr(line)}): "
                    "dump a tree pycr is not part of")
    assert not (tmp_path / "b").exists()


def pid_of_pycr(line):
    import re
    return int(re.search(r"\(pycr is pid (\d+)\)", line).group(1))


def test_encode_into_a_directory_names_it(tmp_path):
    from pycr import images
    from test_formats import sample_inventory
    (tmp_path / "x.json").write_text(images.to_json(sample_inventory(), kind="inventory"))
    line = one_line_error(pycr("encode", "-i", tmp_path / "x.json", "-o", tmp_path, expect=1))
    assert line == f"pycr: {tmp_path}: is a directory: name the image file to write"


# ---- criu's options: -o, -W, -vN, --pidfile, -q, the summary, exit statuses ----

EXIT_ON_USR2 = """#!{python}
import os, signal, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
def report(line):
    os.write(fd, (line + "\\n").encode())
signal.signal(signal.SIGUSR2, lambda *a: os._exit(int(open(sys.argv[1] + ".code").read())))
report("ready %d" % os.getpid())
n = 0
while True:
    n += 1
    report("count %d" % n)
    time.sleep(0.01)
"""


def _summary_line(proc):
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    return lines[0]


def test_log_file_is_written_in_the_images_dir_with_the_narration(spawn, tmp_path, cleanup_pids):
    import re
    import procutil
    w = spawn("counter")
    w.wait_for(r"^count 3$")
    img = tmp_path / "img"
    proc = pycr("dump", "-t", w.pid, "-D", img, "-o", "dump.log", "-R")
    assert proc.stderr == ""                   # the narration went to the file, not the terminal
    assert re.fullmatch(rf"dumped 1 process, 1 thread: [0-9.]+ MiB of pages, frozen [0-9.]+ s; "
                        rf"images in {img}; the tree goes on", _summary_line(proc))
    log = (img / "dump.log").read_text()      # -o without -v: the -v narration
    assert "froze 1 processes, 1 threads with PTRACE_SEIZE + PTRACE_INTERRUPT" in log
    assert f"pid {w.pid}: reading sigactions and brk by injected syscalls" in log
    assert log.splitlines()[-1].startswith("dumped 1 process")    # the summary closes it
    procutil.assert_running_untraced(w.pid)
    # The set with a log file in it restores, and the log of the restore goes to -W.
    w.signal(9)
    procutil.wait_gone([w.pid], timeout=10)
    work = tmp_path / "work"
    work.mkdir()
    mark = w.mark()
    proc = pycr("restore", "-D", img, "-d", "-W", work, "-o", "restore.log", "--pidfile", "root.pid")
    cleanup_pids.add(w.pid)
    assert proc.stderr == ""
    assert _summary_line(proc).startswith(f"restored 1 process, 1 thread from {img} in ")
    assert int((work / "root.pid").read_text()) == w.pid
    assert "images of 1 processes loaded and checked" in (work / "restore.log").read_text()
    assert not (img / "restore.log").exists()
    w.wait_for(r"^count \d+$", start=mark)     # the restored counter goes on
    procutil.assert_running_untraced(w.pid)


def test_criu_verbosity_levels(spawn, tmp_path):
    w = spawn("counter")
    for level in ("-v0", "-v1", "-v2"):        # errors only / warnings: nothing on a good dump
        assert pycr("dump", "-t", w.pid, "-D", tmp_path / level, "-R", "-q", level).stderr == ""
    narrated = pycr("dump", "-t", w.pid, "-D", tmp_path / "v", "-R", "-q", "-v").stderr.splitlines()
    assert narrated[0] == "pycr: froze 1 processes, 1 threads with PTRACE_SEIZE + PTRACE_INTERRUPT"
    v3 = pycr("dump", "-t", w.pid, "-D", tmp_path / "v3", "-R", "-q", "-v3").stderr
    v4 = pycr("dump", "-t", w.pid, "-D", tmp_path / "v4", "-R", "-q", "-v4").stderr
    vv = pycr("dump", "-t", w.pid, "-D", tmp_path / "vv", "-R", "-q", "-vv").stderr
    assert _words(v3) == _words("\n".join(narrated)) and _words(v4) == _words(vv)   # -v3 is -v, -v4 is -vv
    # -o with a level: the file holds that level, the terminal nothing.
    proc = pycr("dump", "-t", w.pid, "-D", tmp_path / "o", "-R", "-q", "-v0", "-o", "quiet.log")
    assert proc.stdout == proc.stderr == "" and (tmp_path / "o" / "quiet.log").read_text() == \
        _summary_of(tmp_path / "o")
    assert pycr("dump", "-t", w.pid, "-D", tmp_path / "bad", "-v7", expect=2).stderr == \
        "pycr: -v7: criu's levels are -v0 to -v4 (see pycr dump --help)\n"


def _words(text):
    """The narration without its numbers (times, sizes and addresses differ between two dumps)."""
    import re
    return re.sub(r"0x[0-9a-f]+|[0-9.]+", "N", text).splitlines()


def _summary_of(img):
    """The summary is the one line a -v0 log holds."""
    text = (img / "quiet.log").read_text()
    assert text.startswith("dumped 1 process") and text.count("\n") == 1, text
    return text


def test_quiet_prints_nothing_and_the_summary_says_what_was_done(spawn, tmp_path):
    w = spawn("counter")
    assert pycr("dump", "-t", w.pid, "-D", tmp_path / "q", "-R", "-q").stdout == ""
    line = _summary_line(pycr("pre-dump", "-t", w.pid, "-D", tmp_path / "p"))
    assert line.startswith("pre-dumped 1 process, 1 thread: ") and line.endswith("; the tree goes on")
    line = _summary_line(pycr("dump", "-t", w.pid, "-D", tmp_path / "k"))
    assert line.endswith(f"images in {tmp_path / 'k'}; the tree was killed")


def test_foreground_restore_exit_status_is_the_roots_and_pycrs_failure_is_told_apart(spawn_python, tmp_path,
                                                                                    cleanup_pids):
    import signal
    import subprocess
    import sys
    import procutil
    w = spawn_python("exit_on_usr2", EXIT_ON_USR2)
    dump_dir = tmp_path / "img"
    pycr("dump", "-t", w.pid, "-D", dump_dir, "-q")
    procutil.wait_gone([w.pid], timeout=10)
    with open(w.status_path + ".code", "w") as f:
        f.write("1")    # the root will exit 1, as pycr fails
    mark = w.mark()
    proc = subprocess.Popen([sys.executable, "-m", "pycr", "restore", "-D", str(dump_dir), "--pidfile",
                             str(tmp_path / "root.pid")], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    cleanup_pids.add(w.pid)
    try:
        procutil.wait_until(lambda: len(w.lines(mark)) >= 2 or proc.poll() is not None, 30)
        assert int((tmp_path / "root.pid").read_text()) == w.pid
        w.signal(signal.SIGUSR2)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1 and err == ""                  # the root's own 1
    assert out.startswith(f"restored 1 process, 1 thread from {dump_dir} in ")
    # pycr's own failure: the same 1, but one "pycr:" line, no summary, no pidfile.
    failed = pycr("restore", "-D", tmp_path / "absent", "--pidfile", tmp_path / "again.pid", expect=1)
    assert failed.stdout == "" and one_line_error(failed) == f"pycr: {tmp_path / 'absent'}: no such image directory"
    assert not (tmp_path / "again.pid").exists()
    # A pidfile that exists is refused before anything is restored, as criu does.
    line = one_line_error(pycr("restore", "-D", dump_dir, "-d", "--pidfile", tmp_path / "root.pid", expect=1))
    assert line == f"pycr: {tmp_path / 'root.pid'}: the pidfile exists already: remove it or name another"
    assert not procutil.exists(w.pid)


def test_help_describes_every_option_and_the_exit_statuses():
    for command in ("dump", "pre-dump", "restore", "migrate"):
        text = pycr(command, "--help").stdout
        for option in ("-o FILE, --log-file FILE", "-q, --quiet", "-v, --verbose", "-W DIR, --work-dir DIR"):
            assert option in text, (command, option)
        assert "--criu-level" not in text
    assert "the root's own status" in pycr("restore", "--help").stdout
    assert "--pidfile FILE" in pycr("restore", "--help").stdout
    assert "2 usage error" in pycr("--help").stdout


def test_criu_habits_are_accepted(spawn, tmp_path, cleanup_pids):
    """What a criu user types: options before the command, `pre-dump -R`, `restore --tcp-established`."""
    import procutil
    w = spawn("counter")
    # -v before the command narrates as -v after it; -o and -q too
    lines = pycr("-v", "dump", "-t", w.pid, "-D", tmp_path / "v", "-R").stderr.splitlines()
    assert lines[0] == "pycr: froze 1 processes, 1 threads with PTRACE_SEIZE + PTRACE_INTERRUPT", lines
    quiet = pycr("-v4", "-q", "-o", "d.log", "dump", "-t", w.pid, "-D", tmp_path / "o", "-R")
    assert quiet.stdout == quiet.stderr == ""
    assert "copying" in (tmp_path / "o" / "d.log").read_text()
    # an option no subcommand takes that way is still refused, by the subcommand's parser
    assert one_line_error(pycr("-q", "show", tmp_path / "v", expect=2)) == \
        "pycr: unrecognized arguments: -q (see pycr show --help)"
    # pre-dump -R: a pre-dump always leaves the tree running
    line = pycr("pre-dump", "-R", "-t", w.pid, "-D", tmp_path / "pre").stdout
    assert line.startswith("pre-dumped 1 process") and line.rstrip().endswith("the tree goes on")
    procutil.assert_running_untraced(w.pid)
    # restore --tcp-established (criu needs it on restore too), with -vv before the command
    pycr("dump", "-t", w.pid, "-D", tmp_path / "k", "-q")
    procutil.wait_gone([w.pid], timeout=10)
    restored = pycr("-vv", "restore", "--tcp-established", "-d", "-D", tmp_path / "k")
    cleanup_pids.add(w.pid)
    assert restored.stdout.startswith("restored 1 process") and "ptrace(PTRACE_SEIZE, " in restored.stderr
    procutil.assert_running_untraced(w.pid)
    text = pycr("restore", "--help").stdout
    assert "--tcp-established" in text and "take established" not in text


def test_a_pipe_to_outside_the_tree_is_told_at_dump_and_restore(tmp_path, cleanup_pids):
    """The writer of a pipe whose reader stays outside: warned at the dump (the user can still act)
    and at the restore, in terms of SIGPIPE, which kills by default."""
    import subprocess
    import sys
    import threading
    import procutil
    p = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(0.1)"],
                         stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    cleanup_pids.add(p.pid)
    # Reaped as soon as the dump kills it, as a shell reaps its jobs: the dump waits until its PID is free.
    threading.Thread(target=p.wait, daemon=True).start()
    try:
        dumped = pycr("dump", "-t", p.pid, "-D", tmp_path / "img")
        ino = __import__("os").fstat(p.stdout.fileno()).st_ino
        assert f"pycr: pipe:[{ino}] has no reader in the tree; after a restore, its writer gets SIGPIPE at its next " \
               f"write (which kills it unless SIGPIPE is ignored or handled: then EPIPE)" in dumped.stderr, dumped.stderr
        p.wait(timeout=10)
        cleanup_pids.add(p.pid)          # again, now free: the restored process is killed at teardown
        restored = pycr("restore", "-d", "-D", tmp_path / "img")
        assert f"pycr: pipe:[{ino}] has no reader in the restored tree; once pycr exits its writer gets SIGPIPE" \
            in restored.stderr, restored.stderr
        procutil.assert_running_untraced(p.pid)
    finally:
        p.stdout.close()

def test_inherit_fd_gives_a_pipes_lonely_end_a_new_reader(tmp_path, cleanup_pids):
    """`prog | reader` with only prog dumped: restored, prog's writes went to a pipe whose reader was
    gone once pycr exited, and SIGPIPE killed it. With --inherit-fd fd[N]:pipe:[INO] (criu's option)
    its stdout is the pipe of pycr's fd N: the test's new reader gets what it goes on writing, and
    the words it had written that nobody had read."""
    import os
    import subprocess
    import sys
    import threading
    import time
    import procutil
    p = subprocess.Popen([sys.executable, "-c", "import sys, time\ni = 0\nwhile True:\n    i += 1\n"
                          "    sys.stdout.write(f'line {i}\\n'); sys.stdout.flush(); time.sleep(0.05)"],
                         stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    cleanup_pids.add(p.pid)
    threading.Thread(target=p.wait, daemon=True).start()
    ino = os.fstat(p.stdout.fileno()).st_ino
    r = w = None
    try:
        assert p.stdout.readline().startswith(b"line ")
        pycr("dump", "-t", p.pid, "-D", tmp_path / "img")
        p.wait(timeout=10)
        cleanup_pids.add(p.pid)
        r, w = os.pipe()
        restored = subprocess.run([sys.executable, "-m", "pycr", "restore", "-d", "-D", tmp_path / "img",
                                   "--inherit-fd", f"fd[{w}]:pipe:[{ino}]"], pass_fds=(w,),
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        assert restored.returncode == 0, restored.stderr
        assert "has no reader" not in restored.stderr, restored.stderr
        os.close(w)
        w = None
        time.sleep(1.0)                 # pycr has exited: a pipe of its own would be readerless now
        procutil.assert_running_untraced(p.pid)
        got = b""
        while got.count(b"\n") < 10:
            got += os.read(r, 4096)
        lines = [int(x.split()[1]) for x in got.splitlines()[:10]]
        assert lines == list(range(lines[0], lines[0] + 10)), lines      # in order, none lost
    finally:
        p.stdout.close()
        for fd in (r, w):
            if fd is not None:
                os.close(fd)


