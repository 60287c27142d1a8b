"""The progress bar of long steps, as a user at a terminal sees it.

`pycr` runs with stdout and stderr on a pseudo-terminal (raw: no \\n -> \\r\\n, so what the test reads is
what pycr wrote). One bar per step over the whole tree: 4 processes of 24 MiB each (every one under
the bar's threshold, the tree over it) show one "dump" bar and one "restore" bar with bytes, rate and
time left, that reach the total and end before the summary line; each pass of `pycr migrate` shows
a bar named after it. With stderr on a pipe nothing of a bar is written.
"""

import fcntl
import os
import re
import signal
import struct
import subprocess
import sys
import termios
import time
import tty

from pycrcmd import pycr
from workload_prelude import WORKLOAD_PRELUDE

from pycr.progress import ERASE

MiB = 1 << 20

# 24 MiB of distinct bytes in the root, shared by fork with 3 children: each of the 4 processes
# has 24 MiB of present private pages. SIGUSR1 makes the root report a checksum of its copy.
TREE_SCRIPT = WORKLOAD_PRELUDE + r"""import zlib
data = bytearray(os.urandom(1 << 20)) * 24
for i in range(0, len(data), 4096):
    data[i] = i // 4096 % 251
kids = []
for _ in range(3):
    kid = os.fork()
    if kid == 0:
        while True:
            time.sleep(0.1)
    kids.append(kid)
report("ready %d" % os.getpid())
while True:
    wait_for_sigusr1()
    report("crc %d" % zlib.crc32(data))
"""

# 2 processes that rewrite 24 MiB each every 10 ms: every migration pass has ~48 MiB to copy.
DIRTYING_SCRIPT = WORKLOAD_PRELUDE + r"""data = bytearray(os.urandom(1 << 20)) * 24
kid = os.fork()
n = 0
if kid:
    report("ready %d" % os.getpid())
while True:
    n = (n + 1) % 251
    for i in range(0, len(data), 4096):
        data[i] = n
    time.sleep(0.01)
"""

KNOWN = re.compile(r"^(?P<label>[a-z0-9 -]+) \[(?P<bar>[#.]{24})\] (?P<done>\d+\.\d)/(?P<total>\d+\.\d) MiB  "
                   r"(?P<rate>\d+(\.\d)? [MG]iB/s|-- MiB/s)  (?P<left>\d+:\d\d|--:--) left$")
UNKNOWN = re.compile(r"^(?P<label>[a-z0-9 -]+) (?P<done>\d+\.\d) MiB  (?P<rate>\d+(\.\d)? [MG]iB/s|-- MiB/s)$")


def on_terminal(*args, columns=120):
    """Run `pycr ARGS` with stdout and stderr on one pseudo-terminal -> (exit status, what it got)."""
    master, slave = os.openpty()
    tty.setraw(slave)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    p = subprocess.Popen([sys.executable, "-m", "pycr", *map(str, args)], stdin=subprocess.DEVNULL,
                         stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    out = bytearray()
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:             # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            out += chunk
        p.wait(timeout=120)
    finally:
        os.close(master)
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, out.decode()


def drawings(out):
    """Every state of the bar drawn, in order: the text after each erase, up to the next one or a newline."""
    return [piece.split("\n")[0] for piece in out.split(ERASE)[1:]]


def bars(out, pattern, label):
    found = [pattern.match(d) for d in drawings(out)]
    return [m for m in found if m and m["label"] == label]


def finished_with(out, summary):
    """The last drawing of the bar is ended by a newline and the summary line follows on its own."""
    last = out.rsplit(ERASE, 1)[1]
    bar, _, rest = last.partition("\n")
    assert re.match(summary, rest), repr(last)
    return bar


def test_dump_and_restore_show_one_bar_over_the_tree(spawn_python, tmp_path, cleanup_pids):
    w = spawn_python("tree96", TREE_SCRIPT)
    cleanup_pids.add(w.pid, *w.descendants())
    start = w.mark()
    w.signal(signal.SIGUSR1)
    crc = w.wait_for(r"^crc \d+$", start=start).group(0)

    status, out = on_terminal("dump", "-t", w.pid, "-D", tmp_path / "img")
    assert status == 0, out
    seen = bars(out, KNOWN, "dump")
    assert seen, repr(out)
    total = float(seen[0]["total"])
    assert 4 * 24 <= total < 4 * (24 + 12), seen[0].group(0)    # the tree's pages (and Python's own)
    assert all(m["total"] == seen[0]["total"] for m in seen)
    last = KNOWN.match(finished_with(out, r"dumped 4 processes, 4 threads: "))
    assert last and last["done"] == last["total"] and last["bar"] == "#" * 24, repr(out)
    assert re.fullmatch(r"\d+(\.\d)? [MG]iB/s", last["rate"]) and last["left"] == "0:00", last.group(0)
    assert "pid " not in out.split("dumped")[0], "no per-process bar"

    status, out = on_terminal("restore", "-d", "-D", tmp_path / "img")
    assert status == 0, out
    seen = bars(out, KNOWN, "restore")
    assert seen and float(seen[0]["total"]) == total, repr(out)
    last = KNOWN.match(finished_with(out, r"restored 4 processes, 4 threads from "))
    assert last and last["done"] == last["total"], repr(out)
    assert re.fullmatch(r"\d+(\.\d)? [MG]iB/s", last["rate"]), last.group(0)
    # while it was filling, the bar said how long was left
    assert all(re.fullmatch(r"\d+:\d\d", m["left"]) or m["left"] == "--:--" for m in seen)

    start = w.mark()                    # the restored tree goes on, with its memory
    w.signal(signal.SIGUSR1)
    assert w.wait_for(r"^crc \d+$", start=start).group(0) == crc


def test_no_bar_when_stderr_is_not_a_terminal_or_with_q(spawn_python, tmp_path, cleanup_pids):
    w = spawn_python("tree96", TREE_SCRIPT)
    cleanup_pids.add(w.pid, *w.descendants())
    piped = pycr("dump", "--leave-running", "-t", w.pid, "-D", tmp_path / "a")
    assert "\r" not in piped.stderr and "\x1b" not in piped.stderr, repr(piped.stderr)
    assert "MiB/s" not in piped.stderr and "[#" not in piped.stderr and piped.stderr == "", repr(piped.stderr)
    assert piped.stdout.startswith("dumped 4 processes")

    status, out = on_terminal("dump", "-q", "--leave-running", "-t", w.pid, "-D", tmp_path / "b")
    assert status == 0 and out == "", repr(out)


def test_log_lines_of_v_are_never_garbled_by_the_bar_and_o_keeps_it(spawn_python, tmp_path, cleanup_pids):
    """-v narrates on the same terminal: the bar's line is erased before each log line, which
    therefore starts a line of its own; the bar is drawn again after it."""
    w = spawn_python("tree96", TREE_SCRIPT)
    cleanup_pids.add(w.pid, *w.descendants())
    status, out = on_terminal("dump", "-v", "--leave-running", "-t", w.pid, "-D", tmp_path / "img")
    assert status == 0, out
    assert bars(out, KNOWN, "dump"), repr(out)
    starts = [m.start() for m in re.finditer(r"pycr: ", out)]
    assert len(starts) > 5
    for at in starts:
        assert at == 0 or out[:at].endswith(("\n", ERASE)), repr(out[max(at - 80, 0):at + 40])
    assert bars(out, KNOWN, "dump")[-1]["done"] == bars(out, KNOWN, "dump")[-1]["total"]

    # -o sends the narration to a file: the terminal keeps the bar, the file gets none of it
    status, out = on_terminal("dump", "-v", "-o", "dump.log", "--leave-running", "-t", w.pid, "-D", tmp_path / "o")
    assert status == 0, out
    assert bars(out, KNOWN, "dump") and "pycr: " not in out, repr(out)
    logged = (tmp_path / "o" / "dump.log").read_text()
    assert "copying" in logged and "\r" not in logged and "MiB/s" not in logged


def test_migrate_shows_one_bar_per_pass(spawn_python, tmp_path, cleanup_pids):
    w = spawn_python("dirtying", DIRTYING_SCRIPT)
    cleanup_pids.add(w.pid, *w.descendants())
    time.sleep(0.05)
    status, out = on_terminal("migrate", "-t", w.pid, "--max-passes", 3, "--min-delta", 0)
    m = re.search(r"\(pid (\d+) outside its namespace, namespace init (\d+)\)", out)
    if m:
        cleanup_pids.add(int(m.group(2)), int(m.group(1)))
    assert status == 0, out
    for number in (1, 2, 3):
        seen = bars(out, UNKNOWN, f"pass {number}")
        assert seen, f"pass {number}: {out!r}"
        assert float(seen[-1]["done"]) >= 32, seen[-1].group(0)
        assert re.fullmatch(r"\d+(\.\d)? [MG]iB/s", seen[-1]["rate"]), seen[-1].group(0)
        # the bar ends on its own line, and the pass's summary follows it
        after = out.split(seen[-1].group(0), 1)[1]
        assert re.match(rf"\npass {number} (pre-dump|dump): ", after), repr(after[:200])
    assert not bars(out, KNOWN, "pass 1") and "pid " not in re.sub(r"replica: root pid.*", "", out)


SMALL_SCRIPT = WORKLOAD_PRELUDE + r"""data = bytearray(os.urandom(1 << 20)) * 48
report("ready %d" % os.getpid())
while True:
    time.sleep(0.1)
"""


def test_a_small_dump_and_restore_move_the_bar(spawn_python, tmp_path, cleanup_pids):
    """~48 MiB in one process: the bar moves during the copy (the first pieces are a few MiB), not
    once at the end; it is drawn at least twice below the total before its final state."""
    w = spawn_python("small48", SMALL_SCRIPT)
    cleanup_pids.add(w.pid)
    status, out = on_terminal("dump", "-t", w.pid, "-D", tmp_path / "img")
    assert status == 0, out
    seen = bars(out, KNOWN, "dump")
    states = sorted({float(m["done"]) for m in seen if m["done"] != m["total"]})
    assert len(states) >= 2 and 48 <= float(seen[-1]["total"]) < 64, [m.group(0) for m in seen]
    assert seen[-1]["done"] == seen[-1]["total"]
    status, out = on_terminal("restore", "-d", "-D", tmp_path / "img")
    assert status == 0, out
    seen = bars(out, KNOWN, "restore")
    assert len({m["done"] for m in seen if m["done"] != m["total"]}) >= 2, [m.group(0) for m in seen]
