"""--display-stats: where a dump, pre-dump or restore spent its time, in criu's layout.

Every phase the command lists is printed, none is negative, and together (with
"Other") they make the command's total, which is no more than the wall time
the caller measured around the whole process.
"""

import re
import time

import procutil
from pycrcmd import pycr

from pycr.stats import COUNTERS, PHASES

PAGE = 4096


def timed_pycr(*args):
    started = time.perf_counter()
    proc = pycr(*args)
    return proc, time.perf_counter() - started


def parse(stdout, what):
    """-> ({phase: us}, {counter: n}, total us) from the stats block that closes stdout."""
    lines = stdout.strip().splitlines()
    start = lines.index(f"Displaying {what} stats:")
    phases, counters, total = {}, {}, None
    for line in lines[start + 1:]:
        m = re.fullmatch(r"(.+) time: (-?\d+) us", line)
        if m and m.group(1) == "Total":
            total = int(m.group(2))
        elif m:
            phases[m.group(1)] = int(m.group(2))
        else:
            name, value = re.fullmatch(r"(.+): (-?\d+)", line).groups()
            counters[name] = int(value)
    return phases, counters, total


def cap(name):
    return name[:1].upper() + name[1:]


def check_adds_up(phases, total, wall, command):
    assert [cap(p) for p in PHASES[command]] + ["Other"] == list(phases), phases
    assert all(us >= 0 for us in phases.values()), phases
    assert total <= wall * 1e6, (total, wall)
    # phases are rounded to 1 us each
    assert abs(sum(phases.values()) - total) <= len(phases), (sum(phases.values()), total)


def test_dump_and_restore_print_every_phase_adding_up_to_the_wall_time(spawn, tmp_path, cleanup_pids):
    w = spawn("counter")
    w.wait_for(r"^count 3$")
    proc, wall = timed_pycr("dump", "-t", w.pid, "-D", tmp_path / "img", "--display-stats")
    phases, counters, total = parse(proc.stdout, "dump")
    check_adds_up(phases, total, wall, "dump")
    for busy in ("Interpreter start", "Freeze", "/proc reads", "Registers", "Injections", "Page copy",
                 "Image write", "Waiting for PIDs to be free"):
        assert phases[busy] > 0, busy
    assert phases["Tracker"] == 0 and phases["Release"] == 0, "a plain dump that kills has neither"
    assert list(counters) == [cap(c) for c in COUNTERS["dump"]]
    assert counters["Processes"] == 1 and counters["Threads"] == 1
    assert 0 < counters["Pages written"] <= counters["Pages scanned"]
    assert counters["Image bytes"] >= counters["Pages written"] * PAGE
    written = counters["Pages written"]

    n = int(w.last("count").split()[1])
    mark = w.mark()
    cleanup_pids.add(w.pid)
    proc, wall = timed_pycr("restore", "-D", tmp_path / "img", "-d", "--display-stats")
    phases, counters, total = parse(proc.stdout, "restore")
    check_adds_up(phases, total, wall, "restore")
    for busy in ("Interpreter start", "Image load and checks", "Task creation", "Mappings", "Page fill",
                 "Files", "Process state", "Registers", "Detach"):
        assert phases[busy] > 0, busy
    assert counters == {"Processes": 1, "Pages filled": written}
    # the restored program goes on from where it was
    w.wait_for(rf"^count {n + 3}$", start=mark)
    procutil.assert_running_untraced(w.pid)


def test_pre_dump_shows_its_tracker_and_no_stats_without_the_option(spawn, tmp_path):
    w = spawn("counter")
    plain = pycr("pre-dump", "-t", w.pid, "-D", tmp_path / "quiet", "-q")
    assert plain.stdout == "", "without --display-stats, -q prints nothing"
    proc, wall = timed_pycr("pre-dump", "-t", w.pid, "-D", tmp_path / "pre", "--display-stats")
    phases, counters, total = parse(proc.stdout, "dump")
    check_adds_up(phases, total, wall, "pre-dump")
    assert phases["Tracker"] > 0 and phases["Release"] > 0 and phases["Page copy"] > 0
    assert phases["Waiting for PIDs to be free"] == 0, "a pre-dump leaves the tree running"
    assert counters["Pages written"] > 0
    procutil.assert_running_untraced(w.pid)
