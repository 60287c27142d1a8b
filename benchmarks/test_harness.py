"""Checks that the benchmark machinery measures what it claims (run: pytest benchmarks/).

Real processes only; every test kills what it started, by PID. No speed is asserted.
"""

import subprocess
import time

import pytest

from benchmarks import compare, limits, procs

MIB = 1 << 20


@pytest.fixture(scope="module", autouse=True)
def _subreaper():
    procs.become_subreaper()


def test_memhog_single_process_reports_stable_checksum():
    with procs.Workload(8) as wl:
        assert wl.pids == [wl.root]
        first = wl.checksums()
        time.sleep(0.1)
        second = wl.checksums()
        assert first[wl.root][1] == second[wl.root][1]
        assert second[wl.root][0] > first[wl.root][0], "ticks must grow while it runs"
        region = procs.find_region(wl.root, 8 * MIB)
        assert procs.state(wl.root) in ("S", "R")
    assert procs.state(wl.root) is None, "the workload must be reaped after the with block"
    assert region


def test_memhog_tree_has_sixteen_processes_four_per_parent():
    with procs.Workload(16, nproc=16) as wl:
        assert len(wl.pids) == 16
        assert len(procs.children(wl.root)) == 4
        sums = wl.checksums()
        assert sorted(sums) == sorted(wl.pids)
        assert len({s for _, s in sums.values()}) == 16, "each process holds different data"
        pids = list(wl.pids)
    assert all(procs.state(p) is None for p in pids)


def test_memhog_rewrites_pages_at_the_asked_rate():
    with procs.Workload(4, rate_pct=100) as wl:
        first = wl.checksums()[wl.root][1]
        time.sleep(0.3)
        assert wl.checksums()[wl.root][1] != first


def test_kill_spares_an_older_process_that_holds_a_listed_pid():
    older = subprocess.Popen(["sleep", "60"])
    time.sleep(0.05)  # start times have a resolution of one clock tick (10 ms)
    try:
        with procs.Workload(1) as wl:
            wl.pids.append(older.pid)  # as if a PID had been reused by something older
            assert wl.kill() == []
            assert procs.state(older.pid) in ("S", "R")
            assert procs.state(wl.root) is None
    finally:
        older.kill()
        older.wait()


def test_hole_target_memory_is_not_populated():
    with procs.HoleTarget(64 * MIB) as hole:
        with open(f"/proc/{hole.pid}/smaps") as f:
            text = f.read()
        start = f"{hole.addr:x}-"
        block = text[text.index(start):].split("VmFlags")[0]
        rss_kb = int(block.split("Rss:")[1].split()[0])
        assert rss_kb == 0
        pid = hole.pid
    assert procs.state(pid) is None


def test_limits_measure_gives_every_figure():
    res = limits.measure(size=32 * MIB, rounds=1, pause=0, native=False)
    for name in ("process_vm_readv, 1 iovec", "process_vm_writev into unpopulated memory, 1 iovec",
                 "write + fsync of a new file"):
        assert len(res[name]) == 1 and res[name][0] > 0
    assert "GiB/s" in limits.format_table(res, 32 * MIB)


def test_vm_copy_moves_the_bytes():
    with procs.Workload(2) as wl:
        addr = procs.find_region(wl.root, 2 * MIB)
        buf = limits.warm_buffer(2 * MIB)
        try:
            limits._vm_copy(limits._libc.process_vm_readv, wl.root, limits._addr(buf), addr, 2 * MIB, 4096)
            with open(f"/proc/{wl.root}/mem", "rb") as mem:
                mem.seek(addr)
                assert mem.read(2 * MIB) == bytes(buf)
        finally:
            buf.close()


def test_criu_round_restores_the_same_memory(tmp_path):
    criu = compare.Criu()
    why = criu.problem()
    if why:
        pytest.skip(why)
    res = compare.one_round(criu, 16, 4, tmp_path, pause=0)
    assert res["image_mib"] >= 16
    assert res["dump_s"] > 0 and res["restore_s"] > 0


def test_missing_tool_is_reported_in_one_line():
    why = compare.Criu("/nonexistent/criu").problem()
    assert why and "\n" not in why and "not found" in why


def test_frozen_time_is_read_from_either_tool_output():
    assert compare.criu_frozen_seconds("Displaying dump stats:\nFrozen time: 55675 us\n") == 0.055675
    assert compare.criu_frozen_seconds("no stats here") is None
    text = "pycr: dump done: 64.1 MiB of pages, frozen 0.120 s, total 0.2 s\npycr: frozen until release: 0.080000 s\n"
    assert compare.pycr_frozen_seconds(text) == 0.08
    assert compare.pycr_frozen_seconds(text.splitlines()[0]) == 0.12


def test_freeze_clock_stamps_a_dump_that_leaves_the_tree_running(tmp_path):
    from benchmarks.pycr_runs import full_dump
    with procs.Workload(8) as wl:
        before = wl.checksums()
        stats = full_dump(wl.root, tmp_path / "d", leave_running=True)
        assert 0 < stats.until_release_seconds <= stats.frozen_seconds <= stats.total_seconds
        assert stats.pages_bytes >= 8 * MIB
        assert wl.alive() and wl.checksums()[wl.root][1] == before[wl.root][1]
    import pycr.dump
    from pycr.freeze import freeze
    assert pycr.dump.freeze is freeze, "the clock puts pycr's freeze back"


def test_plot_and_report_from_a_comparison_json(tmp_path):
    pytest.importorskip("matplotlib")
    import json
    from benchmarks import plot, report
    ok = {"dump_s": 0.2, "frozen_s": 0.1, "image_mib": 64.1, "restore_s": 0.3}
    data = {"machine": "m", "date": "2026-11-26T00:00", "tools": {"criu": "Version: 4.1.1", "pycr": "pycr 0.1.0"},
            "results": {label: {t: {"ok": [ok], "failed": []} for t in ("criu", "pycr")}
                        for label in ("64 MiB", "2 GiB", "512 MiB x16 procs")},
            "limits": {plot.READV: [5.0], plot.DIRECT_WRITE: [1.6], plot.WRITEV_FRESH: [1.0]}}
    assert list(plot.single_process_sizes(data["results"])) == [64, 2048]
    out = tmp_path / "p.png"
    plot.draw(data, out)
    assert out.read_bytes()[:4] == b"\x89PNG"
    table = report.compare_tables(json.loads(json.dumps(data)))
    assert "| 2 GiB | frozen (s) | 0.100 | 0.100 | 1.00 |" in table


def test_run_timed_is_not_rounded_to_a_polling_step(tmp_path):
    # subprocess's timed wait sleeps 0.5, 1, 2, ... 32 then 50 ms between checks: a 120 ms
    # command came out as 163.5 ms at best. The pidfd wait wakes at the exit.
    with open(tmp_path / "log", "wb") as log:
        run = procs.run_timed(["sleep", "0.12"], log)
    assert run.returncode == 0
    assert 0.12 <= run.seconds < 0.1635, run.seconds
    with open(tmp_path / "log", "wb") as log:
        run = procs.run_timed(["sh", "-c", "exit 3"], log)
    assert run.returncode == 3 and run.seconds < 0.05


def test_run_timed_kills_and_reaps_on_timeout(tmp_path):
    started = time.perf_counter()
    with open(tmp_path / "log", "wb") as log, pytest.raises(subprocess.TimeoutExpired):
        procs.run_timed(["sleep", "30"], log, timeout=0.2)
    assert time.perf_counter() - started < 5


def test_reap_on_exit_frees_a_killed_tree_at_once_and_stops_when_told():
    import os
    import signal
    import threading
    with procs.Workload(16, nproc=16) as wl:
        r, w = os.pipe()
        try:
            got = []
            reaper = threading.Thread(target=lambda: got.append(procs.reap_on_exit(wl.pids, r)))
            reaper.start()
            for pid in wl.pids:
                os.kill(pid, signal.SIGKILL)
            reaper.join(10)
            assert got == [[]], "every pid of the tree is reaped, also those re-parented to us"
            assert all(procs.state(p) is None for p in wl.pids)
        finally:
            os.close(r)
            os.close(w)
    with procs.Workload(1) as wl:
        r, w = os.pipe()
        try:
            got = []
            reaper = threading.Thread(target=lambda: got.append(procs.reap_on_exit(wl.pids, r)))
            reaper.start()
            os.write(w, b"x")
            reaper.join(10)
            assert got == [wl.pids] and wl.alive()
        finally:
            os.close(r)
            os.close(w)


def test_display_stats_is_read_from_either_tool_output():
    criu = ("(00.100) noise\nDisplaying dump stats:\nFreezing time: 120 us\nFrozen time: 55675 us\n"
            "Memory dump time: 30000 us\nPages scanned: 16463 (0x404f)\nPages written: 16400 (0x4010)\n")
    got = compare.display_stats(criu)
    assert got["phases"] == {"Freezing": 0.00012, "Frozen": 0.055675, "Memory dump": 0.03}
    assert got["counters"] == {"Pages scanned": 16463, "Pages written": 16400}
    pycr_out = "pycr: x\nDisplaying restore stats:\nPage fill time: 84000 us\nOther time: 10 us\n" \
               "Total time: 90000 us\nPages filled: 16400\n"
    got = compare.display_stats(pycr_out)
    assert got == {"phases": {"Page fill": 0.084, "Other": 0.00001}, "counters": {"Pages filled": 16400},
                   "total_s": 0.09}
    assert compare.display_stats("no stats") is None
