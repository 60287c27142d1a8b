"""Convergence of `pycr migrate`: the downtime budget, --bandwidth-limit, and auto-converge.

The workload dirties memory at a rate per second of the CPU it gets (so a CPU
throttle really slows it), cycling through a region of its own; rates are
chosen relative to the --bandwidth-limit the copy is paced to, which any
machine running these tests copies faster than, so the figures hold on a slow
machine too. Assertions are on pycr's own report (pass lines, summary) and on
the kernel's view of the tree (its cgroup, the throttle group's existence).
"""

import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import procutil
from pycrcmd import pycr
from test_migrate import registering

from pycr.errors import PycrError
from pycr.migrate import migrate
from pycr.migrate.policy import PassFigures, Policy
from pycr.migrate.throttle import Throttle, groups_of
from workload_prelude import WORKLOAD_PRELUDE

MIB = 1 << 20
LINK = 8 * MIB                  # --bandwidth-limit of every test
REGION = 4 * MIB                # what the workload cycles through: half a second of the link

DIRTIER = WORKLOAD_PRELUDE + r"""import mmap
size, rate = SIZE, RATE         # bytes of the region; bytes dirtied per second of CPU
m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)   # shared memory is copied whole each pass
m.madvise(mmap.MADV_NOHUGEPAGE)     # a write to a huge page would dirty all of its 2 MiB
pages = size // 4096
for i in range(pages):
    m[i * 4096] = 1
report("ready %d" % os.getpid())
done, n, owed, last = 0, 0, 0.0, time.process_time()
while True:
    now = time.process_time()
    owed += max(now - last, 0.0) * rate / 4096      # a replica's CPU time starts again from 0
    last = now
    while owed >= 1:
        m[(done % pages) * 4096 + 8] = done & 255
        done += 1
        owed -= 1
    n += 1
    if n % 20000 == 0:
        report("count %d" % done)
    if go:                          # SIGUSR1: is every page what the writes so far made it?
        go.pop()
        bad = [i for i in range(pages) if m[i * 4096] != 1
               or m[i * 4096 + 8] != ((i + pages * ((done - 1 - i) // pages)) & 255 if done > i else 0)]
        report("verify %s %d" % ("bad %d" % bad[0] if bad else "ok", done))
"""

SUMMARY_DOWNTIME = re.compile(r"^downtime ([0-9.]+) s \(source frozen", re.M)
MIGRATED = re.compile(r"\(pid (\d+) outside its namespace, namespace init (\d+)\)")


def dirtier(spawn_python, rate, size=REGION):
    return spawn_python("dirtier", DIRTIER.replace("SIZE", str(size)).replace("RATE", str(int(rate))))


def cpu_cgroup(pid):
    """pid's line for each hierarchy, as /proc shows it (v1 cpu and v2)."""
    return [line for line in open(f"/proc/{pid}/cgroup").read().splitlines()
            if line.startswith("0::") or ":cpu:" in line or ":cpu," in line]


def throttle_groups():
    """Every pycr throttle cgroup on the host (there must be none left)."""
    out = []
    for top, dirs, _ in os.walk("/sys/fs/cgroup"):
        out += [os.path.join(top, d) for d in dirs if "pycr-throttle-" in d]
        dirs[:] = [d for d in dirs if "pycr-throttle-" not in d]
    return out


@pytest.fixture
def throttle_available():
    th = Throttle(os.getpid(), 1.0)
    if not th.available:
        pytest.skip(f"no CPU throttle here: {th.mechanism.detail}")
    return th.mechanism.kind


# ---------------------------------------------------------------- the arithmetic

def test_policy_arithmetic_with_made_up_passes():
    """bandwidth, fixed cost, remaining bytes, expected downtime, switch and throttle steps by hand (the
    passes carry no CPU measure: QEMU's steps, the fallback, apply)."""
    p = Policy(max_passes=10, downtime_limit=0.25)
    # pass 1: 100 MiB in 10 s of copy + 1 s else; the tree froze at t=0
    p.record(PassFigures(1, False, 100 * MIB, 11.0, 10.0, frozen_at=0.0))
    assert p.bandwidth() == 10 * MIB and p.fixed_cost() == 1.0       # only the first pass yet
    assert p.decide(11.0).final is False                              # never before a pass of changes
    # pass 2: 60 MiB dirtied in the 10 s since pass 1 froze (6 MiB/s), copied in 6 s, 0.1 s else
    p.record(PassFigures(2, False, 60 * MIB, 6.1, 6.0, frozen_at=10.0, dirty_seconds=10.0))
    assert p.history[-1].dirty_rate == 6 * MIB
    assert p.fixed_cost() == pytest.approx(0.1)                      # the first pass (replica built) left out
    assert p.bandwidth() == 10 * MIB                                  # (100 + 60) MiB / 16 s
    # at t=15: 5 s of dirtying at 6 MiB/s remain: 0.1 + 30 MiB / 10 MiB/s = 3.1 s
    assert p.remaining(15.0) == 30 * MIB
    assert p.expected_downtime(15.0) == pytest.approx(3.1)
    d = p.decide(15.0)
    assert not d.final and d.throttle == 0                            # one fast pass is not two
    # pass 3: 40 MiB in 6.5 s (6.2 MiB/s > half the bandwidth again): the throttle starts at 20 %
    p.record(PassFigures(3, False, 40 * MIB, 4.2, 4.0, frozen_at=16.5, dirty_seconds=6.5))
    assert p.fixed_cost() == pytest.approx(0.2)                       # the larger of the last two
    d = p.decide(23.0)
    assert (d.final, d.throttle) == (False, 20)
    p.record(PassFigures(4, False, 20 * MIB, 2.2, 2.0, frozen_at=23.0, dirty_seconds=6.5, throttle=20))
    assert p.decide(25.0).throttle == 30                              # still over budget: +10
    # pass 5, throttled: 0.5 MiB in 2 s; decided at its freeze: nothing dirtied yet, only the fixed cost
    p.record(PassFigures(5, False, MIB // 2, 0.15, 0.05, frozen_at=25.0, dirty_seconds=2.0, throttle=30))
    bw = (40 + 20 + 0.5) * MIB / (4.0 + 2.0 + 0.05)
    assert p.bandwidth() == pytest.approx(bw)
    assert p.fixed_cost() == pytest.approx(0.2)
    assert p.expected_downtime(25.0) == pytest.approx(0.2)
    d = p.decide(25.0)
    assert d.final and d.throttle == 30 and not d.missed              # budget met: switch, keep the throttle
    # the pass limit ends it whatever the budget says
    q = Policy(max_passes=3, downtime_limit=0.001)
    q.history = p.history[:2]
    d = q.decide(15.0)
    assert d.final and d.missed
    q.give_up = True
    assert q.decide(15.0).give_up
    # no limit: today's rules (the delta stopped shrinking)
    r = Policy(max_passes=10)
    r.history = [PassFigures(1, False, 100, 1, 1, 0), PassFigures(2, False, 5 << 20, 1, 1, 1),
                 PassFigures(3, False, 6 << 20, 1, 1, 2)]
    assert r.decide(3.0).final and r.decide(3.0).throttle == 0
    # a bandwidth limit caps the measure
    assert PassFigures(1, False, 100 * MIB, 1.0, 1.0, 0.0, bandwidth_limit=LINK).bandwidth == LINK


def test_policy_aims_the_throttle_from_measured_rates():
    """The throttle from the dirty rate, the bandwidth and the CPU the tree used, by hand."""
    p = Policy(max_passes=10, downtime_limit=0.3)
    p.record(PassFigures(1, False, 1000 * MIB, 10.0, 10.0, frozen_at=0.0))      # 100 MiB/s, no fixed cost
    # pass 2: 1000 MiB dirtied in the 10 s of pass 1, using 0.1 CPU (1 s of CPU): 1000 MiB per CPU s
    taken = PassFigures(2, False, 1000 * MIB, 0, 0, frozen_at=10.0, dirty_seconds=10.0, cpu_seconds=1.0)
    assert taken.cores == pytest.approx(0.1) and taken.dirty_per_cpu == 1000 * MIB
    # aim: sending it takes 10 s; aim^2 x 10 s / bw <= 0.3 s x bw -> aim = sqrt(0.03) x 100 MiB/s
    aim = 0.03 ** 0.5 * 100 * MIB
    assert p.aim_rate(10.0, 100 * MIB, 0.0) == pytest.approx(aim)
    # the CPU that dirties at that rate: aim / 1000 MiB per CPU s, of the 0.1 CPU the tree used (83 %);
    # the pass did not shrink (the tree rewrote its pages: the rate per CPU s is a lower bound): halved
    aimed = math.ceil(100 * (1 - aim / (1000 * MIB) / 0.1))
    assert aimed == 83
    pct = p.throttle_after(taken)
    assert pct == math.ceil(100 - (100 - aimed) / 2) == 92
    assert p.base_cores == pytest.approx(0.1) and p.measured
    # throttled at 92 %, the next pass still dirtied faster than its aim: the share left is at least halved
    p.record(taken)
    p.throttle = pct
    again = PassFigures(3, False, 600 * MIB, 0, 0, frozen_at=20.0, dirty_seconds=10.0, cpu_seconds=0.5, throttle=92)
    assert p.throttle_after(again) == 96
    # a slow dirtier (under half the bandwidth) is not throttled; an unmeasured CPU falls back to the steps
    q = Policy(max_passes=10, downtime_limit=0.3)
    q.record(PassFigures(1, False, 1000 * MIB, 10.0, 10.0, frozen_at=0.0))
    assert q.throttle_after(PassFigures(2, False, 400 * MIB, 0, 0, 10.0, dirty_seconds=10.0, cpu_seconds=1.0)) == 0
    assert q.throttle_after(PassFigures(2, False, 900 * MIB, 0, 0, 10.0, dirty_seconds=10.0)) is None
    assert not q.measured


# ---------------------------------------------------------------- real migrations

def test_slow_dirtier_converges_within_the_budget(spawn_python, cleanup_pids):
    """Dirtying at a tenth of the link: no throttle, the switch comes once the budget is met, and the
    summary's measured downtime is within it."""
    w = dirtier(spawn_python, LINK / 10)
    proc = pycr("migrate", "-t", w.pid, "--bandwidth-limit", LINK, "--downtime-limit", 500, "--max-passes", 8)
    m = MIGRATED.search(proc.stdout)
    cleanup_pids.add(int(m.group(2)), int(m.group(1)))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("pass ")]
    assert all(re.search(r", bandwidth [0-9.]+ MiB/s, dirty (-|[0-9.]+ MiB/s)", line) for line in lines), lines
    assert all(line.endswith("throttle 0 %") for line in lines), lines
    rates = [float(x) for x in re.findall(r"bandwidth ([0-9.]+) MiB/s", proc.stdout)]
    assert max(rates) <= LINK / MIB + 0.05, rates          # paced: never above the limit
    assert len(lines) < 8, proc.stdout                      # switched on the budget, not the pass limit
    assert "downtime budget 500 ms met" in proc.stdout, proc.stdout
    assert float(SUMMARY_DOWNTIME.search(proc.stdout).group(1)) <= 0.5
    # the replica goes on dirtying (its counter moves)
    root = int(m.group(1))
    n = int(w.last("count").split()[1])
    w.wait_for(rf"^count (?!{n}$)\d+$", start=w.mark() - 1, root=False)
    assert not groups_of(root)


def test_throttled_tree_sits_in_the_group_and_is_let_go(spawn_python, cleanup_pids, throttle_available):
    """Dirtying at four times the link (per CPU second: still more than the link on a loaded machine):
    the tree is throttled, and the throttle never eases while the budget is not met (in its throttle
    cgroup meanwhile); after the migration nothing is left throttled and the replica never was."""
    w = dirtier(spawn_python, 4 * LINK)
    before = cpu_cgroup(w.pid)
    seen = []

    def look(rep, replica):
        if rep.kind == "pre-dump":
            seen.append((rep.throttle, groups_of(w.pid)))

    res = migrate(w.pid, policy=Policy(max_passes=16, downtime_limit=0.25, bandwidth_limit=LINK),
                  on_pass=registering(cleanup_pids, then=look))
    cleanup_pids.add(w.pid)
    steps = [r.throttle for r in res.reports]
    first = next((i for i, pct in enumerate(steps) if pct), None)
    assert first is not None and first >= 2, [r.line() for r in res.reports]   # the full copy, one fast pass
    assert steps[first:] == sorted(steps[first:]), [r.line() for r in res.reports]
    # while a throttle was in force the tree sat in pycr's group
    assert all(groups for pct, groups in seen if pct), seen
    # Whether the budget was then met (the policy switching on it, or at the pass limit) depends on
    # how loaded this machine is, which a test cannot know: the summary reports it either way.
    assert any(line.startswith("downtime budget 250 ms") for line in res.summary.lines()), res.summary.lines()
    assert res.summary.throttle_max == max(steps)
    assert throttle_groups() == []
    replica_root = res.replica.tasks[w.pid].real
    assert cpu_cgroup(replica_root) == before               # the replica was never throttled


def test_fast_dirtier_converges_with_an_aimed_throttle(spawn_python, cleanup_pids, throttle_available):
    """Dirtying 8 times faster than the link per CPU second: the throttle is aimed from the measured
    dirty rate, bandwidth and CPU use, so the final pass is chosen on the budget within a few passes and
    carries little, each pass line says the throttle in force, and the replica goes on with every page
    as the writes left it.

    QEMU's steps (20 %, +10 % per pass) leave this tree dirtying faster than the link up to the pass
    limit: the final dump then carries the whole region and the budget is missed."""
    link = 4 * LINK
    size = link * 3 // 4                                      # 3/4 s of the link
    w = dirtier(spawn_python, 8 * link, size=size)
    proc = pycr("migrate", "-t", w.pid, "--bandwidth-limit", link, "--downtime-limit", 500, "--max-passes", 10)
    m = MIGRATED.search(proc.stdout)
    cleanup_pids.add(int(m.group(2)), int(m.group(1)))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("pass ")]
    throttles = [int(re.search(r", throttle (\d+) %$", line).group(1)) for line in lines]
    assert max(throttles) >= 50, proc.stdout                  # the tree was throttled, and the lines say so
    assert len(lines) < 10 and "pass limit" not in proc.stderr, proc.stdout + proc.stderr    # on the budget
    expected = re.search(r"^downtime budget 500 ms (?:met|missed by \d+ ms) \(expected (\d+) ms\)$", proc.stdout, re.M)
    assert expected and int(expected.group(1)) <= 500, proc.stdout
    # converged in bytes: the final pass carries part of what the tree keeps rewriting (the
    # measured downtime also holds the destination's work, which a loaded machine stretches)
    final = int(re.search(r"^pass \d+ dump: .*?, (\d+) bytes", proc.stdout, re.M).group(1))
    assert final < size * 2 // 3, proc.stdout                 # stepped, it carries the whole region again
    assert re.search(r"^auto-converge: the source was throttled up to \d+ %", proc.stdout, re.M), proc.stdout
    assert throttle_groups() == []
    root = int(m.group(1))
    assert not groups_of(root)
    # the replica goes on writing, and every page holds what the writes before and after the move left
    n = int(w.last("count").split()[1])
    w.wait_for(rf"^count (?!{n}$)\d+$", start=w.mark() - 1, root=False)
    mark = w.mark()
    os.kill(root, signal.SIGUSR1)
    verdict = w.wait_for(r"^verify .*", start=mark, root=False)
    assert verdict.group(0).startswith("verify ok "), verdict.group(0)


def test_failed_migration_lifts_the_throttle(spawn_python, cleanup_pids, throttle_available):
    """A migration failing while the tree is throttled puts every task back in its own cgroup."""
    w = dirtier(spawn_python, 3 * LINK)
    before = cpu_cgroup(w.pid)

    def fail(rep, replica):
        if rep.throttle:
            assert groups_of(w.pid)
            raise PycrError("the test breaks the migration while throttled")

    with pytest.raises(PycrError, match="breaks the migration"):
        migrate(w.pid, policy=Policy(max_passes=16, downtime_limit=0.01, bandwidth_limit=LINK),
                on_pass=registering(cleanup_pids, then=fail))
    assert cpu_cgroup(w.pid) == before and throttle_groups() == []
    procutil.assert_running_untraced(w.pid)
    n = int(w.last("count").split()[1])
    w.wait_for(rf"^count (?!{n}$)\d+$", start=w.mark() - 1)


def test_sigkilled_pycr_leaves_a_throttle_that_cleanup_removes(spawn_python, cleanup_pids, throttle_available):
    """pycr SIGKILLed with the throttle on: `pycr check -t` names the throttle group, `pycr cleanup -t`
    moves the tree back and removes it."""
    w = dirtier(spawn_python, 3 * LINK)
    before = cpu_cgroup(w.pid)
    mig = subprocess.Popen([sys.executable, "-m", "pycr", "migrate", "-t", str(w.pid), "--bandwidth-limit",
                            str(LINK), "--downtime-limit", "10", "--max-passes", "30"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert procutil.wait_until(lambda: groups_of(w.pid), timeout=40), "the tree was never throttled"
        time.sleep(0.2)
        mig.kill()
        mig.wait()
        assert groups_of(w.pid)                             # left throttled by the kill
        check = pycr("check", "-t", w.pid, expect=3)
        assert "pycr's CPU throttle cgroup" in check.stdout, check.stdout
        pycr("cleanup", "-t", w.pid)
        assert cpu_cgroup(w.pid) == before and throttle_groups() == []
        assert "nothing of pycr's" in pycr("check", "-t", w.pid).stdout
        procutil.assert_running_untraced(w.pid)
        n = int(w.last("count").split()[1])
        w.wait_for(rf"^count (?!{n}$)\d+$", start=w.mark() - 1)
    finally:
        if mig.poll() is None:
            mig.kill()
            mig.wait()


def test_unmeetable_budget_says_by_how_much_it_missed(spawn_python, cleanup_pids):
    """A 1 ms budget with 3 passes: the final dump is taken anyway, with one warning line and a summary
    that says by how much; with --abort-over-budget the migration stops and the tree goes on."""
    w = dirtier(spawn_python, LINK / 10)
    stop = pycr("migrate", "-t", w.pid, "--bandwidth-limit", LINK, "--downtime-limit", 1, "--max-passes", 3,
                "--abort-over-budget", expect=1)
    assert stop.stderr.strip().splitlines()[-1].startswith("pycr: the downtime budget of 1 ms cannot be met "
                                                           "within 3 passes"), stop.stderr
    procutil.assert_running_untraced(w.pid)
    proc = pycr("migrate", "-t", w.pid, "--bandwidth-limit", LINK, "--downtime-limit", 1, "--max-passes", 3)
    m = MIGRATED.search(proc.stdout)
    cleanup_pids.add(int(m.group(2)), int(m.group(1)), w.pid)
    warnings = [line for line in proc.stderr.splitlines() if "budget" in line]
    assert len(warnings) == 1 and re.match(r"pycr: warning: pass limit 3 reached with an expected downtime of "
                                           r"\d+ ms, over the 1 ms budget", warnings[0]), proc.stderr
    downtime = float(SUMMARY_DOWNTIME.search(proc.stdout).group(1))
    missed = re.search(r"^downtime budget 1 ms missed by (\d+) ms", proc.stdout, re.M)
    assert missed and abs(int(missed.group(1)) - (downtime * 1000 - 1)) <= 1, proc.stdout
