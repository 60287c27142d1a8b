"""Bad inputs end in one line naming the cause: no traceback, never "internal error"."""

import os
import subprocess

import pytest

import procutil
from pycrcmd import one_line_error, pycr


def _fails_in_one_line(*args):
    line = one_line_error(pycr(*args, expect=1))
    assert "internal error" not in line
    return line


def _kthreadd():
    """A kernel thread's PID: kthreadd's, found by its name (2 in the initial namespace)."""
    for pid in sorted(int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            if open(f"/proc/{pid}/comm").read().strip() == "kthreadd":
                return pid
        except OSError:
            continue
    pytest.skip("no kernel thread is visible in this PID namespace")


def test_a_kernel_thread_is_refused(tmp_path):
    pid = _kthreadd()
    line = _fails_in_one_line("dump", "-t", pid, "-D", tmp_path / "img")
    assert line == f"pycr: pid {pid} is a kernel thread: it has no user memory or registers to dump"
    assert not (tmp_path / "img").exists() or not os.listdir(tmp_path / "img")


def test_init_is_refused_by_name(tmp_path):
    for command in ("dump", "pre-dump"):
        line = _fails_in_one_line(command, "-t", 1, "-D", tmp_path / command)
        assert line == "pycr: pid 1 is init: pycr does not dump it"
    assert _fails_in_one_line("migrate", "-t", 1) == "pycr: pid 1 is init: pycr does not dump it"


def test_an_unknown_option_names_the_subcommands_help(spawn, tmp_path):
    w = spawn("counter")
    for command, args in (("dump", ("-t", w.pid, "-D", tmp_path / "a")), ("restore", ("-D", tmp_path)),
                          ("pre-dump", ("-t", w.pid, "-D", tmp_path / "b")), ("migrate", ("-t", w.pid))):
        line = one_line_error(pycr(command, *args, "--frob", expect=2))
        assert line == f"pycr: unrecognized arguments: --frob (see pycr {command} --help)"
    assert os.path.exists(f"/proc/{w.pid}") and not (tmp_path / "a").exists()


def test_a_log_file_that_cannot_be_written_is_one_line(spawn, tmp_path):
    w = spawn("counter")
    line = _fails_in_one_line("restore", "-D", tmp_path / "none", "-o", "restore.log")
    assert line == f"pycr: {tmp_path / 'none' / 'restore.log'}: cannot write the log file: No such file or directory"
    line = _fails_in_one_line("dump", "-t", w.pid, "-D", tmp_path / "img", "-R", "-o", "no/such/dir/d.log",
                              "-W", "/proc")
    assert "cannot write the log file" in line
    assert os.path.exists(f"/proc/{w.pid}")


def test_a_pid_nobody_has(tmp_path):
    pid_max = int(open("/proc/sys/kernel/pid_max").read())
    assert "no such process" in _fails_in_one_line("dump", "-t", pid_max + 1, "-D", tmp_path / "img")


def test_a_file_where_a_directory_is_expected(spawn, tmp_path):
    w = spawn("counter")
    afile = tmp_path / "afile"
    afile.write_text("")
    assert "afile" in _fails_in_one_line("dump", "-t", w.pid, "-D", afile, "-R")
    assert "afile" in _fails_in_one_line("restore", "-D", afile)
    assert "afile" in _fails_in_one_line("restore", "-D", afile, "--follow", "--follow-timeout", "1")
    assert "afile" in _fails_in_one_line("migrate", "-t", w.pid, "--work-dir", afile / "work")
    assert os.path.exists(f"/proc/{w.pid}")        # the tree runs on


def test_images_on_a_read_only_filesystem(spawn, tmp_path):
    w = spawn("counter")
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        assert "Read-only" in _fails_in_one_line("dump", "-t", w.pid, "-D", ro / "img", "-R")
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    assert os.path.exists(f"/proc/{w.pid}")


def test_an_image_into_a_missing_directory(tmp_path):
    src = tmp_path / "x.json"
    src.write_text('{"kind": "inventory"}')
    _fails_in_one_line("encode", "-i", src, "-o", tmp_path / "x.img")
    good = tmp_path / "pstree.json"
    good.write_text('{"kind": "pstree", "version": 2, "body": {"processes": [], "zombies": []}}')
    line = _fails_in_one_line("encode", "-i", good, "-o", tmp_path / "missing" / "pstree.img")
    assert "missing/pstree.img" in line and ".tmp" not in line


def test_a_wrong_combination_of_options_is_a_usage_error(spawn, tmp_path):
    """Exit 2 and a pointer to the subcommand's help, as argparse's own errors, before anything is made
    or frozen (-o would make the images directory of a dump)."""
    w = spawn("counter")
    secret = tmp_path / "secret"
    secret.write_text("s3cret")
    secret.chmod(0o600)
    img = tmp_path / "img"
    cases = [
        (("dump", "-t", w.pid, "-D", img, "-R", "-o", "d.log", "--port", 4000),
         "dump", "--port is for --page-server, which was not given"),
        (("dump", "-t", w.pid, "-D", img, "-o", "d.log", "--page-server", "--address", "localhost"),
         "dump", "--page-server needs --port, --secret-file"),
        (("dump", "-t", w.pid, "-D", img, "--lazy-pages", "-R", "--address", "localhost", "--port", 1,
          "--secret-file", secret), "dump", "--lazy-pages serves the pages itself"),
        (("pre-dump", "-t", w.pid, "-D", img, "--secret-file", secret),
         "pre-dump", "--secret-file is for --page-server, which was not given"),
        (("lazy-pages", "-D", img, "--address", "localhost"),
         "lazy-pages", "--address is for --page-server, which was not given"),
        (("restore", "-D", img, "--follow", "--lazy-pages"), "restore", "--lazy-pages restores one image set"),
        (("migrate", "-t", w.pid, "--to", "localhost", "--secret-file", secret),
         "migrate", "--to localhost: give it as HOST:PORT"),
        (("migrate", "-t", w.pid, "--to", "localhost:4000"), "migrate", "--to and --secret-file go together"),
        (("migrate", "-t", w.pid, "--abort-over-budget"), "migrate", "--abort-over-budget needs --downtime-limit"),
        (("migrate", "-t", w.pid, "--mode", "hybrid"), "migrate", "--mode post-copy and hybrid migrate to another"),
        (("serve", "--listen", "localhost", "--secret-file", secret), "serve", "--listen localhost: give it as"),
    ]
    for args, command, words in cases:
        line = one_line_error(pycr(*args, expect=2))
        assert line.startswith(f"pycr: {words}") and line.endswith(f" (see pycr {command} --help)"), line
    assert not img.exists()
    procutil.assert_running_untraced(w.pid)
