"""pycr show --dirty-map: a program writes a known pattern between the passes of a pre-dump
chain (and of a migration); the map has exactly those pages in those passes, as data, as
text and as pixels of the picture; without matplotlib, or on a directory that is no chain,
one line and exit 1."""

import os
import shutil
import struct
import subprocess
import sys

import pytest

from pycrcmd import one_line_error, pycr
from workload_prelude import WORKLOAD_PRELUDE
from pycr import dirtymap
from pycr.errors import ImageError
from pycr.migrate import migrate
from pycr.migrate.loop import Policy

PAGE = os.sysconf("SC_PAGE_SIZE")
REGION_PAGES = 256
PATTERN = {1: range(0, 32), 2: range(128, 160)}     # pages of the region written at each SIGUSR1

PATTERN_SCRIPT = WORKLOAD_PRELUDE + """import ctypes, mmap
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
P = mmap.PAGESIZE
addr = libc.mmap(None, 256 * P, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
report("region %x" % addr)
report("ready %d" % os.getpid())
step = 0
while True:
    wait_for_sigusr1()
    step += 1
    for page in (range(0, 32) if step == 1 else range(128, 160)):
        ctypes.memset(addr + page * P, step, P)
    report("wrote %d" % step)
"""


def start_pattern(spawn_python):
    w = spawn_python("pattern", PATTERN_SCRIPT)
    region = int(w.last("region").split()[1], 16)
    return w, region


def write_step(w, step):
    mark = w.mark()
    os.kill(w.pid, __import__("signal").SIGUSR1)
    w.wait_for(rf"^wrote {step}$", start=mark)


def in_region(pm, index, region, which="written"):
    """Page numbers of the region that pass `index` saved (written) or kept."""
    runs = getattr(pm, which)[index] or []
    end = region + REGION_PAGES * PAGE
    return sorted((a - region) // PAGE for s, e in runs for a in range(max(s, region), min(e, end), PAGE))


def make_chain(spawn_python, tmp_path):
    """pass 1 after the first writes, pass 2 after the second, then a final dump (-R):
    -> (workload, region address, last set)."""
    w, region = start_pattern(spawn_python)
    write_step(w, 1)
    pycr("pre-dump", "-t", w.pid, "-D", tmp_path / "d1", "-q")
    write_step(w, 2)
    pycr("pre-dump", "-t", w.pid, "-D", tmp_path / "d2", "--prev-images-dir", "../d1", "-q")
    pycr("dump", "-R", "-t", w.pid, "-D", tmp_path / "d3", "--prev-images-dir", "../d2", "-q")
    return w, region, tmp_path / "d3"


def assert_pattern(dmap, pid, region):
    assert len(dmap.passes) == 3
    pm = dmap.processes[pid]
    assert in_region(pm, 0, region) == list(PATTERN[1])
    assert in_region(pm, 1, region) == list(PATTERN[2])
    assert in_region(pm, 2, region) == []
    # The first pages stay present, kept from pass 1; the rest of the region was never touched.
    assert in_region(pm, 1, region, "kept") == list(PATTERN[1])
    assert in_region(pm, 2, region, "kept") == list(PATTERN[1]) + list(PATTERN[2])
    return pm


def png_size(path):
    """(width, height) from the IHDR chunk of a PNG file, after checking its signature."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", head[:8]
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def is_blue(rgb):
    r, g, b = rgb[:3]
    return b > 0.5 and b - r > 0.3


def test_chain_map_has_the_pattern_as_data_text_and_pixels(spawn_python, tmp_path):
    w, region, last = make_chain(spawn_python, tmp_path)
    # Data: from the last set, parents followed back; and the same from the directory of sets.
    pm = assert_pattern(dirtymap.load(last), w.pid, region)
    assert [p.name for p in dirtymap.load(tmp_path).passes] == ["d1", "d2", "d3"]
    assert_pattern(dirtymap.load(tmp_path), w.pid, region)
    assert pm.outside == 0
    assert any(r.start <= region and region + REGION_PAGES * PAGE <= r.end for r in pm.regions)
    # Text: every pass's page count, and a strip per pass.
    out = pycr("show", "--dirty-map", last).stdout
    assert f"pid {w.pid} (pattern.py)" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("pass ") and "pages" in line]
    assert [(r[1], int(r[2])) for r in rows] == [(str(i + 1), pm.pages(i)) for i in range(3)]
    assert pm.pages(1) >= len(PATTERN[2]) and pm.pages(0) > pm.pages(1)
    # Picture: a PNG of the expected size, whose cells are blue exactly where the pages were saved.
    png = tmp_path / "map.png"
    done = pycr("show", "--dirty-map", last, "-o", png)
    assert str(png) in done.stdout
    width, height = png_size(png)
    assert width == 1200 and 200 <= height <= 2000, (width, height)
    from pycr.dirtymap_draw import draw
    import matplotlib.image
    layout = draw(dirtymap.load(last), tmp_path / "again.png")
    pixels = matplotlib.image.imread(png)
    assert (pixels == matplotlib.image.imread(tmp_path / "again.png")).all()
    at = lambda index, page: pixels[layout.pixel(w.pid, index, region + page * PAGE)[::-1]]
    assert is_blue(at(1, 144)), at(1, 144)               # written in pass 2
    assert not is_blue(at(1, 220)), at(1, 220)           # never written
    assert not is_blue(at(1, 16)), at(1, 16)             # written in pass 1, kept in pass 2
    assert is_blue(at(0, 16)) and not is_blue(at(0, 144))
    assert not is_blue(at(2, 144))
    # Readable: the region written after pass 1 is widened and named, and so is the stack
    # (the Python program's own writes between passes); no label runs off the picture.
    _, _, placed = layout.panels[w.pid]
    mine = next(p for p in placed if p[0].start <= region < p[0].end)
    assert mine[2] >= 0.05 * sum(n for _, _, n in placed), placed
    named = [reg.label for reg in layout.named[w.pid]]
    assert mine[0] in layout.named[w.pid] and "[stack]" in named, named
    assert layout.label_spans and all(0 <= x0 and x1 <= width for x0, x1 in layout.label_spans), layout.label_spans


def test_migration_work_dir(spawn_python, tmp_path, cleanup_pids):
    w, region = start_pattern(spawn_python)
    write_step(w, 1)

    def between(rep, replica):
        cleanup_pids.add(*replica.reals)
        if rep.kind == "pre-dump" and rep.number == 1:
            write_step(w, 2)

    work = tmp_path / "work"
    migrate(w.pid, work_dir=work, policy=Policy(max_passes=3, min_delta=0), on_pass=between)
    dmap = dirtymap.load(work)
    assert [(p.name, p.kind) for p in dmap.passes] == [("01-pre-dump", "pre-dump"), ("02-pre-dump", "pre-dump"),
                                                     ("03-dump", "dump")]
    assert_pattern(dmap, w.pid, region)
    out = pycr("show", "--dirty-map", work).stdout
    assert "pass 3: 03-dump (dump" in out


def test_without_matplotlib_one_line_and_exit_1(spawn_python, tmp_path):
    w, region, last = make_chain(spawn_python, tmp_path)
    fake = tmp_path / "nomatplotlib"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    env = dict(os.environ, PYTHONPATH=str(fake))
    run = lambda *args: subprocess.run([sys.executable, "-m", "pycr", "show", "--dirty-map", last, *args],
                                       capture_output=True, text=True, env=env, timeout=120)
    png = tmp_path / "map.png"
    proc = run("-o", png)
    assert proc.returncode == 1
    assert one_line_error(proc) == ("pycr: drawing the dirty map needs matplotlib: pip install 'pycr[plot]' "
                                    "(without -o, pycr show --dirty-map prints it as text)")
    assert not png.exists()
    text = run()
    assert text.returncode == 0 and f"pid {w.pid} (" in text.stdout


def test_a_format_matplotlib_cannot_write_is_a_usage_error(spawn_python, tmp_path):
    w, region, last = make_chain(spawn_python, tmp_path)
    line = one_line_error(pycr("show", "--dirty-map", last, "-o", tmp_path / "m.txt", expect=2))
    assert line.startswith(f"pycr: -o {tmp_path / 'm.txt'}: matplotlib cannot write .txt files; name it .png")
    assert line.endswith("(see pycr show --help)") and not (tmp_path / "m.txt").exists()
    assert "dirty map of 3 passes" in pycr("show", "--dirty-map", last, "-o", tmp_path / "m.svg").stdout
    assert (tmp_path / "m.svg").read_text().lstrip().startswith("<?xml")


def test_not_a_chain(spawn_python, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_line_error(pycr("show", "--dirty-map", empty, expect=1))
    assert line == f"pycr: {empty}: {dirtymap.NOT_A_CHAIN}"
    line = one_line_error(pycr("show", "--dirty-map", tmp_path / "absent", "-o", tmp_path / "m.png", expect=1))
    assert line == f"pycr: {tmp_path / 'absent'}: no such directory"
    assert not (tmp_path / "m.png").exists()
    # Two chains in one directory: which one is meant?
    w, region, last = make_chain(spawn_python, tmp_path / "chain")
    shutil.copytree(tmp_path / "chain" / "d1", tmp_path / "chain" / "other")
    line = one_line_error(pycr("show", "--dirty-map", tmp_path / "chain", expect=1))
    assert "holds 2 chains (last sets d3, other): name the last set of one" in line
    assert_pattern(dirtymap.load(last), w.pid, region)          # the last set still names one
    # A chain whose first pass is gone.
    shutil.rmtree(tmp_path / "chain" / "d1")
    with pytest.raises(ImageError, match="missing: the parent named by .*d2's inventory"):
        dirtymap.load(last)
    one_line_error(pycr("show", "--dirty-map", last, expect=1))
