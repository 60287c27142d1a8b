"""Checks that benchmarks.net_migrate measures what it claims (run: pytest benchmarks/test_net_migrate.py).

The parsing and arithmetic on known lines, and the dirtier workload as a real process: a stop
of the program shows as its gap, an armed touch reads every page once it is restored, the dirty rate is the one
asked. No migration and no speed is asserted.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from benchmarks import net_migrate as nm, procs

MIB = 1 << 20


def test_heartbeat_takes_the_longest_gap_since_the_start_and_the_touch():
    lines = ["ready 42", "gap 100 900", "hb 1000 5", "gap 2000 2500", "gap 3000 7000", "hb 8000 9",
             "touched 268435456 500000000", "gap 9000 9400"]
    gap, last_hb, touched = nm.heartbeat(lines, since_ns=1500)
    assert gap == pytest.approx(4000 / 1e9)           # the gap before 1500 does not count
    assert last_hb == 8000
    assert touched == (268435456, 0.5)
    # a gap that began before the start counts from the start only
    assert nm.heartbeat(["gap 1000 5000"], since_ns=3000)[0] == pytest.approx(2000 / 1e9)
    assert nm.heartbeat(["hb 5 0"], since_ns=0) == (0.0, 5, None)


def test_veth_delta_counts_both_ways_and_rates_parse_as_tc_does():
    assert nm.veth_delta((100, 10), (1100, 60)) == 1050
    assert nm.tc_rate_bits("1gbit") == 1e9
    assert nm.tc_rate_bits("40mbit") == 40e6
    assert nm.tc_rate_bits("125mbps") == 1e9
    with pytest.raises(ValueError):
        nm.tc_rate_bits("fast")


def test_pycr_figures_from_its_reports():
    migrate = ("pass 3 dump: +0 -0 tasks, 13 pages, 71717 bytes, 0.1 s\n"
               "downtime 0.067 s (source frozen -> replica running), 33987125 bytes sent in 3 passes, 0.9 s in all\n")
    assert nm.pycr_figures(migrate) == {"reported_downtime_s": 0.067, "passes": 3, "report": migrate.splitlines()}
    lazy = ("lazy-pages: 65600 pages placed (900 on 880 faults, 64700 pushed), 2 zero, 0 dropped by the program, "
            "0 forks, in 2.31 s; fault median 25.3 us, p99 11247.0 us; 256.0 MiB from the source")
    assert nm.pycr_figures(lazy) == {"fault_median_us": 25.3, "fault_p99_us": 11247.0}


def test_switch_phases_cuts_the_final_pass_at_pycr_lines():
    from benchmarks import switch_phases as sp
    src = sp.stamped_lines("pass 1 pre-dump: ...\n10.000000 froze 1 processes, 1 threads; tracker uffd-wp, pass 0\n"
                           "10.100000 pre-dump done: 1.0 MiB\n20.000000 froze 1 processes, 1 threads; tracker "
                           "uffd-wp, pass 1\n20.050000 dump done: 0.2 MiB of pages\n")
    dst = sp.stamped_lines("10.500000 peer x: replica complete and stopped: READY sent, waiting for KILLED\n"
                           "20.070000 peer x: replica complete and stopped: READY sent, waiting for KILLED\n"
                           "20.072000 detached 1 threads of 1 processes\n")
    assert sp.final_pass(src, dst) == (20.0, 20.05, 20.07, 20.072)     # the last freeze, not the first


def test_last_error_names_the_cause_and_skips_criu_rlimit_noise():
    log = ("(00.05) Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self\n"
           "(00.9) Error (criu/page-pipe.c:424): page-pipe: splice: -1: Bad file descriptor\n"
           "(00.9) Error (criu/cr-dump.c:2111): Dumping FAILED.\n")
    assert "splice" in nm.last_error(log, first=True)
    assert "Dumping FAILED" in nm.last_error(log)
    assert nm.last_error("") == "(no output)"


def test_summary_takes_medians_keeps_failures_and_prints_them():
    rows = [dict(method="pycr-precopy", mib=256, rate_pct=1.0, link="1gbit", heartbeat_downtime_s=s,
                 total_s=t, bytes=b, reported_downtime_s=s) for s, t, b in ((0.05, 3.0, 300 * MIB),
                                                                            (0.07, 4.0, 290 * MIB),
                                                                            (0.06, 5.0, 280 * MIB))]
    rows.append(dict(method="pycr-precopy", mib=256, rate_pct=1.0, link="1gbit", error="pycr migrate failed"))
    s = nm.summarize(rows)
    assert (s["rounds"], s["failed"]) == (3, 1)
    assert s["heartbeat_downtime_s"] == 0.06 and s["total_s"] == 4.0 and s["bytes"] == 290 * MIB
    failed = nm.summarize([dict(method="criu-lazy", mib=256, rate_pct=20.0, link="1gbit", error="splice")])
    table = nm.format_table([s, failed])
    assert "| pycr-precopy | 256 | 1 | 60 | 60 | 4.00 | 290.0 | - | - |" in table
    assert "criu-lazy 256 MiB 20 %/s: splice" in table
    assert "1 round(s) failed: pycr migrate failed" in table


def test_every_method_is_one_table_entry():
    names = [m.name for m in nm.METHODS]
    assert len(names) == len(set(names))
    modes = {m.name: m.args for m in nm.METHODS if m.run is nm.run_pycr_migrate}
    assert modes["pycr-postcopy"] == ("--mode", "post-copy") and modes["pycr-hybrid"] == ("--mode", "hybrid")


@pytest.fixture
def dirtier(tmp_path):
    """start(mib, rate, touch) -> (Popen, log path); it and its restored copy are killed by PID at the end."""
    started = []

    def start(mib, rate, touch=0):
        log = tmp_path / f"dirtier-{len(started)}.txt"
        with open(log, "ab") as out:
            p = subprocess.Popen([procs.build_workload("dirtier"), str(mib), str(rate), str(touch)],
                                 stdout=out, stdin=subprocess.DEVNULL, start_new_session=True)
        started.append(p)
        deadline = time.monotonic() + 30
        while "ready" not in log.read_text():
            assert p.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.01)
        return p, log

    yield start
    for p in started:
        p.kill()
        p.wait()
        try:
            os.kill(p.pid, signal.SIGKILL)      # the restored copy, when a test made one
        except ProcessLookupError:
            pass


def pycr(*args):
    subprocess.run([sys.executable, "-m", "pycr", *map(str, args)], check=True, cwd=nm.REPO, env=nm.ENV,
                   capture_output=True, timeout=120)


def test_dirtier_touches_every_page_only_once_it_runs_as_a_restored_task(dirtier, tmp_path):
    p, log = dirtier(8, 0, touch=1)
    time.sleep(0.2)
    since = time.monotonic_ns()
    os.kill(p.pid, signal.SIGUSR1)          # armed: the first gap after which it is another task
    time.sleep(0.05)
    os.kill(p.pid, signal.SIGSTOP)          # a freeze of a pre-copy pass: a gap, still the same task
    time.sleep(0.3)
    os.kill(p.pid, signal.SIGCONT)
    time.sleep(0.3)
    gap, _, touched = nm.heartbeat(log.read_text().splitlines(), since)
    assert 0.3 <= gap < 5 and touched is None, log.read_text()[-500:]

    pycr("dump", "-t", p.pid, "-D", tmp_path / "img")     # the task ends here and comes back below
    p.wait()
    pycr("restore", "-D", tmp_path / "img", "-d")
    deadline = time.monotonic() + 10
    while (res := nm.heartbeat(log.read_text().splitlines(), since))[2] is None:
        assert time.monotonic() < deadline, log.read_text()[-500:]
        time.sleep(0.05)
    nbytes, seconds = res[2]
    assert nbytes == 8 * MIB and seconds > 0


def test_dirtier_writes_the_asked_share_of_its_pages(dirtier):
    p, log = dirtier(16, 50)                # 4096 pages, half of them per second
    time.sleep(1.2)

    def writes():
        hb = [line.split() for line in log.read_text().splitlines() if line.startswith("hb ")]
        return int(hb[-1][1]), int(hb[-1][2])
    (t0, w0) = writes()
    time.sleep(1.0)
    (t1, w1) = writes()
    rate = (w1 - w0) / ((t1 - t0) / 1e9)
    assert 2048 * 0.8 < rate < 2048 * 1.2, rate
