"""CPU state across dump and restore: AVX-512 and AMX registers, other CPUs' XSAVE layouts.

The xstate workload keeps a pattern in zmm31 and in AMX tile 0 and checks
them every step; a restore must give both back, with the tile permission
(ARCH_REQ_XCOMP_PERM) asked for again. An image read on a CPU whose XSAVE
layout differs is rewritten here as if it came from one (the components at
other offsets), and must come back just as well; one that uses state this
CPU lacks is refused before any task exists.
"""

import struct

import pytest

import procutil
from pycr.images import ImageDir
from pycr.manifest import reseal
from pycr.ptrace import xstate as X
from pycrcmd import one_line_error, pycr

LOCAL = X.local_layout()
AVX512 = (1 << 5) | (1 << 6) | (1 << 7)


def checks_after(w, mark, count=5):
    w.wait_for(r"^check \d+ ", start=mark)
    for _ in range(count):
        w.wait_for(r"^check \d+ ", start=w.mark())
    return [line for line in w.lines(mark) if line.startswith("check ")]


def start(spawn):
    w = spawn("xstate")
    has = w.wait_for(r"^has avx512 (\d) amx (\d)$")
    w.wait_for(r"^check 3 ok$")
    return w, has.group(1) == "1", has.group(2) == "1"


def other_layout(layout):
    """The same components packed from offset 576 on, in index order: a layout no
    CPU of this vendor has (AMD's AVX-512 also starts right after AVX)."""
    comps, offset = {}, X.MIN_SIZE
    for i, (_, size) in sorted(layout.components.items()):
        comps[i] = (offset, size)
        offset += size
    return X.Layout(layout.xcr0, offset, comps)


def rewrite(img_path, pids, change):
    """Apply change(core, inventory) to every core image, then seal the set again."""
    img = ImageDir(img_path)
    inv = img.read("inventory")
    for pid in pids:
        core = img.read("core", pid)
        change(core, inv)
        img.write("core", core, pid)
    img.write("inventory", inv)
    reseal(img_path)


def test_dump_records_this_cpu(spawn, tmp_path):
    w, _, _ = start(spawn)
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img", "-R")
    img = ImageDir(tmp_path / "img")
    cpu = img.read("inventory").cpu
    assert X.layout_of_record(cpu) == LOCAL
    xs = img.read("core", w.pid).threads[0].xstate
    assert len(xs) == LOCAL.size == cpu.xstate_size
    assert X.in_use(xs) & ~LOCAL.xcr0 == 0


def test_extended_registers_come_back(spawn, tmp_path, cleanup_pids):
    w, avx, amx = start(spawn)
    if not (avx or amx):
        pytest.skip("this CPU has neither AVX-512 nor AMX (CPUID leaf 7)")
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img")
    core = ImageDir(tmp_path / "img").read("core", w.pid)
    assert bool(core.xcomp_perm & X.DYNAMIC_COMPONENTS) == amx
    mark = w.mark()
    cleanup_pids.add(w.pid)
    pycr("restore", "-D", tmp_path / "img", "-d")
    lines = checks_after(w, mark)
    assert all(line.endswith(" ok") for line in lines), lines
    # a counting step from where it stopped, not from 1
    assert int(lines[0].split()[1]) > 3


def test_image_of_another_xsave_layout_comes_back(spawn, tmp_path, cleanup_pids):
    """The components move from the dumped offsets to this CPU's: zmm31 and the
    tile come back only if each moved to its own place."""
    w, avx, amx = start(spawn)
    if not (avx or amx):
        pytest.skip("this CPU has neither AVX-512 nor AMX (CPUID leaf 7)")
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img")
    other = other_layout(LOCAL)
    assert other != LOCAL and other.size != LOCAL.size

    def as_if_from_other(core, inv):
        for th in core.threads:
            th.xstate = X.convert(th.xstate, LOCAL, other)
        inv.cpu.xstate_size = other.size
        inv.cpu.xstate_components = [dict(index=i, offset=o, size=n) for i, (o, n) in sorted(other.components.items())]

    rewrite(tmp_path / "img", [w.pid], as_if_from_other)
    mark = w.mark()
    cleanup_pids.add(w.pid)
    pycr("restore", "-D", tmp_path / "img", "-d")
    lines = checks_after(w, mark)
    assert all(line.endswith(" ok") for line in lines), lines


def test_state_this_cpu_lacks_is_refused_before_any_task(spawn, tmp_path):
    missing = next(i for i in range(2, 20) if not LOCAL.xcr0 >> i & 1 and i in X.COMPONENT_NAMES)
    w = spawn("counter")
    w.wait_for(r"^count 3$")
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img")

    def as_if_using_it(core, inv):
        th = core.threads[0]
        xs = bytearray(th.xstate) + bytes(8)
        bv = struct.unpack_from("<Q", xs, X.XSTATE_BV_OFFSET)[0]
        struct.pack_into("<Q", xs, X.XSTATE_BV_OFFSET, bv | 1 << missing)
        th.xstate = bytes(xs)
        for other in core.threads[1:]:
            other.xstate = bytes(other.xstate) + bytes(8)
        inv.cpu.xcr0 |= 1 << missing
        inv.cpu.xstate_components.append(dict(index=missing, offset=inv.cpu.xstate_size, size=8))
        inv.cpu.xstate_size += 8

    rewrite(tmp_path / "img", [w.pid], as_if_using_it)
    line = one_line_error(pycr("restore", "-D", tmp_path / "img", "-d", expect=1))
    assert line == (f"pycr: pid {w.pid}: the dumped thread uses CPU state the target does not have: "
                    f"{X.COMPONENT_NAMES[missing]} (xstate components {1 << missing:#x})")
    assert not procutil.exists(w.pid)


def test_tile_permission_this_cpu_cannot_grant_is_refused(spawn, tmp_path):
    if LOCAL.xcr0 & X.DYNAMIC_COMPONENTS:
        pytest.skip("this CPU has AMX: the permission is granted (test_extended_registers_come_back)")
    w = spawn("counter")
    w.wait_for(r"^count 3$")
    pycr("dump", "-t", w.pid, "-D", tmp_path / "img")
    rewrite(tmp_path / "img", [w.pid], lambda core, inv: setattr(core, "xcomp_perm", X.DYNAMIC_COMPONENTS))
    line = one_line_error(pycr("restore", "-D", tmp_path / "img", "-d", expect=1))
    assert "amx-tiledata" in line and "ARCH_REQ_XCOMP_PERM" in line
    assert not procutil.exists(w.pid)


def test_convert_refuses_what_the_target_lacks_and_round_trips():
    """A regset read here, moved to another layout and back, is the same bytes;
    moved to a layout without AVX-512 while AVX-512 is in use, it is refused by name."""
    from pycr.ptrace.thread import Thread
    import subprocess
    import sys
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        t = Thread(child.pid)
        t.seize()
        t.interrupt()
        t.wait(5)
        xs = t.get_xstate()
        t.detach()
    finally:
        child.kill()
        child.wait()
    assert len(xs) == LOCAL.size
    other = other_layout(LOCAL)
    assert X.convert(X.convert(xs, LOCAL, other), other, LOCAL) == xs
    if LOCAL.xcr0 & AVX512:
        used = bytearray(xs)
        struct.pack_into("<Q", used, X.XSTATE_BV_OFFSET, X.in_use(xs) | 1 << 6)
        small = X.Layout(LOCAL.xcr0 & ~AVX512, 832, {2: LOCAL.components[2]})
        with pytest.raises(Exception, match="avx512-zmm-hi256"):
            X.convert(bytes(used), LOCAL, small)
