"""What sits in pipes and FIFOs comes back: buffered bytes and the pipe's size."""

import signal
import zlib

import pytest

import procutil
from pycrcmd import one_line_error, pycr

FIFO_SCRIPT = """#!{python}
import os, signal, sys, time
st = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
def report(line):
    os.write(st, (line + "\\n").encode())
path = os.path.join(os.path.dirname(sys.argv[1]), "fifo")
os.mkfifo(path)
r = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
w = os.open(path, os.O_WRONLY)
os.set_blocking(r, True)
data = b"fifo data " + bytes(range(256)) * 8
os.write(w, data)
want = []
signal.signal(signal.SIGUSR1, lambda *a: want.append(1))
report("sent %d" % len(data))
report("ready %d" % os.getpid())
while not want:
    time.sleep(0.01)
got = os.read(r, len(data))            # blocks while the FIFO is empty (the writer is open)
report("got %d %08x" % (len(got), __import__("zlib").crc32(got)))
while True:
    time.sleep(0.1)
"""

FIFO_DATA = b"fifo data " + bytes(range(256)) * 8


def test_fifo_data_is_written_back(spawn_python, tmp_path, cleanup_pids):
    w = spawn_python("fifo", FIFO_SCRIPT)
    dump_dir = tmp_path / "img"
    pycr("dump", "-t", w.pid, "-D", dump_dir)
    cleanup_pids.add(w.pid)
    pycr("restore", "-D", dump_dir, "-d")
    got = w.signal_and_wait(signal.SIGUSR1, r"^got (\d+) ([0-9a-f]+)$", timeout=10)
    assert int(got.group(1)) == len(FIFO_DATA)
    assert int(got.group(2), 16) == zlib.crc32(FIFO_DATA)


PIPE_SCRIPT = """#!{python}
import fcntl, os, signal, sys, time, zlib
st = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
def report(line):
    os.write(st, (line + "\\n").encode())
size, count = {size}, {count}
r, w = os.pipe()
fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size)
data = bytes((i * 7 + 3) & 0xff for i in range(count))
view = memoryview(data)
while view:
    view = view[os.write(w, view):]
want = []
signal.signal(signal.SIGUSR1, lambda *a: want.append(1))
report("ready %d" % os.getpid())
while not want:
    time.sleep(0.01)
size_now = fcntl.fcntl(r, fcntl.F_GETPIPE_SZ)
os.set_blocking(r, False)
chunks = []
while True:
    try:
        chunk = os.read(r, 1 << 20)
    except BlockingIOError:
        break
    chunks.append(chunk)
got = b"".join(chunks)
report("pipe %d %d %08x" % (size_now, len(got), zlib.crc32(got)))
while True:
    time.sleep(0.1)
"""


def _pipe_workload(spawn_python, size, count):
    script = PIPE_SCRIPT.replace("{size}", str(size)).replace("{count}", str(count))
    return spawn_python("bigpipe", script)


def _expected(count):
    return zlib.crc32(bytes((i * 7 + 3) & 0xFF for i in range(count)))


def test_pipe_size_and_all_its_data_come_back(spawn_python, tmp_path, cleanup_pids):
    """A pipe grown to 1 MiB holding 200 KiB: same size after restore, every byte there."""
    size, count = 1 << 20, 200 << 10
    w = _pipe_workload(spawn_python, size, count)
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img")
    cleanup_pids.add(w.pid)
    pycr("restore", "-D", tmp_path / "img", "-d")
    got = w.signal_and_wait(signal.SIGUSR1, r"^pipe (\d+) (\d+) ([0-9a-f]+)$", timeout=10)
    assert (int(got.group(1)), int(got.group(2)), int(got.group(3), 16)) == (size, count, _expected(count))


def test_small_pipe_stays_small(spawn_python, tmp_path, cleanup_pids):
    """A pipe shrunk to one page is not given the default size back."""
    import mmap
    w = _pipe_workload(spawn_python, mmap.PAGESIZE, 100)
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img")
    cleanup_pids.add(w.pid)
    pycr("restore", "-D", tmp_path / "img", "-d")
    got = w.signal_and_wait(signal.SIGUSR1, r"^pipe (\d+) (\d+) ([0-9a-f]+)$", timeout=10)
    assert (int(got.group(1)), int(got.group(2))) == (mmap.PAGESIZE, 100)


@pytest.fixture
def pipe_max_size():
    """Raise /proc/sys/fs/pipe-max-size for a moment; put back the machine's value at once after."""
    path = "/proc/sys/fs/pipe-max-size"
    with open(path) as f:
        original = int(f.read())

    def set_to(value):
        with open(path, "w") as f:
            f.write(str(value))

    try:
        yield original, set_to
    finally:
        set_to(original)


def test_pipe_data_that_cannot_all_be_copied_fails_the_dump(spawn_python, tmp_path, pipe_max_size):
    """A pipe larger than pipe-max-size (made while the limit was higher) holding more than
    pycr can tee: the dump fails naming the pipe, and the tree runs on with its data intact."""
    original, set_to = pipe_max_size
    size, count = 2 * original, original + (original >> 1)
    set_to(size)
    try:
        w = _pipe_workload(spawn_python, size, count)
    finally:
        set_to(original)
    proc = pycr("dump", "-t", w.pid, "-D", tmp_path / "img", expect=1)
    line = one_line_error(proc)
    assert f"pid {w.pid} fd " in line and f"holds {count}" in line and "F_SETPIPE_SZ" in line
    procutil.assert_running_untraced(w.pid)
    got = w.signal_and_wait(signal.SIGUSR1, r"^pipe (\d+) (\d+) ([0-9a-f]+)$", timeout=10)
    assert (int(got.group(2)), int(got.group(3), 16)) == (count, _expected(count))
