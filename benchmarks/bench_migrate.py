"""Downtime of `pycr migrate` against a plain dump followed by a restore of the same workload.

Run: pytest benchmarks/bench_migrate.py [--benchmark-only]   (PYCR_BENCH_MIGRATE_MIB="256 2048"
to choose the sizes; default 256). The workload is memhog writing 1 % of its pages every second.

- test_dump_then_restore: the timed call is `dump` (tree frozen and killed) followed by
  `restore --pidns -d`: the whole of it is downtime.
- test_migrate: the timed call is the whole migration (the source runs during most of it);
  its downtime (source frozen -> replica running), bytes moved and passes are in extra_info.

Nothing is asserted about speed. A summary table is printed at the end of the module.
Every round starts its own workload and kills the source and the replica by PID.
"""

import os
import shutil
import statistics
import time

import pytest

from benchmarks import procs
from pycr.dump import dump_tree
from pycr.migrate import migrate
from pycr.migrate.loop import Policy
from pycr.native import core
from pycr.restore.restorer import restore

SIZES = [int(x) for x in os.environ.get("PYCR_BENCH_MIGRATE_MIB", "256").split()]
RATE_PCT = 1.0
WARM_SECONDS = 1.0
ROUNDS = int(os.environ.get("PYCR_BENCH_ROUNDS", "3"))
RESULTS = {}


@pytest.fixture(scope="module", autouse=True)
def _subreaper_and_summary(request):
    procs.become_subreaper()
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or not RESULTS:
        return
    reporter.write_line("")
    reporter.write_line(f"migration downtime vs dump + restore (memhog, {RATE_PCT:g} % of pages per second)")
    for mib in sorted({k[1] for k in RESULTS}):
        plain = RESULTS.get(("plain", mib))
        mig = RESULTS.get(("migrate", mib))
        if not plain or not mig:
            continue
        p, d = statistics.median(plain["downtime"]), statistics.median(mig["downtime"])
        reporter.write_line(
            f"{mib:>5} MiB: dump+restore {p:.3f} s ({statistics.median(plain['bytes']) / 2**20:.0f} MiB), "
            f"migrate downtime {d:.3f} s = {d / p:.1%} of it, total {statistics.median(mig['total']):.2f} s, "
            f"{statistics.median(mig['bytes']) / 2**20:.0f} MiB moved in "
            f"{statistics.median(mig['passes']):.0f} passes")


def _stub_children():
    """Our children that run the restore stub (a PID namespace's init)."""
    stub = core.stub_path()
    out = set()
    for pid in procs.children(os.getpid()):
        try:
            if os.readlink(f"/proc/{pid}/exe") == stub:
                out.add(pid)
        except OSError:
            pass
    return out


def _dir_bytes(path):
    return sum(e.stat().st_size for e in os.scandir(path) if e.is_file())


def _start(mib):
    wl = procs.Workload(mib, rate_pct=RATE_PCT).start()
    time.sleep(WARM_SECONDS)
    return wl


def _record(kind, mib, **values):
    slot = RESULTS.setdefault((kind, mib), {})
    for key, value in values.items():
        slot.setdefault(key, []).append(value)


@pytest.mark.parametrize("mib", SIZES)
def test_dump_then_restore(benchmark, mib, tmp_path):
    state = {}

    def setup():
        images = tmp_path / f"img-{time.monotonic_ns()}"
        state["wl"], state["images"], state["before"] = _start(mib), images, _stub_children()
        return (), {}

    def dump_and_restore():
        started = time.monotonic()
        dump_tree(state["wl"].root, str(state["images"]))
        restore(str(state["images"]), detach=True, pidns=True)
        _record("plain", mib, downtime=time.monotonic() - started, bytes=_dir_bytes(state["images"]))

    def teardown(*_args, **_kwargs):
        procs.kill_pids(sorted(_stub_children() - state["before"]))   # the restored tree's init
        state["wl"].cleanup()
        shutil.rmtree(state["images"], ignore_errors=True)

    benchmark.pedantic(dump_and_restore, setup=setup, teardown=teardown, rounds=ROUNDS, iterations=1)
    benchmark.extra_info["downtime_s"] = RESULTS[("plain", mib)]["downtime"]
    benchmark.extra_info["bytes"] = RESULTS[("plain", mib)]["bytes"]


@pytest.mark.parametrize("mib", SIZES)
def test_migrate(benchmark, mib, tmp_path):
    state = {}

    def setup():
        state["wl"], state["reals"] = _start(mib), []
        state["work"] = tmp_path / f"work-{time.monotonic_ns()}"
        return (), {}

    def run():
        reals = state["reals"]
        started = time.monotonic()
        res = migrate(state["wl"].root, work_dir=state["work"], policy=Policy(),
                      on_pass=lambda rep, replica: reals.extend(r for r in replica.reals if r not in reals))
        _record("migrate", mib, total=time.monotonic() - started, downtime=res.summary.downtime,
                bytes=res.summary.total_bytes, passes=res.summary.passes)

    def teardown(*_args, **_kwargs):
        procs.kill_pids(state["reals"][:1])     # the namespace's init takes the replica with it
        state["wl"].cleanup()
        shutil.rmtree(state["work"], ignore_errors=True)

    benchmark.pedantic(run, setup=setup, teardown=teardown, rounds=ROUNDS, iterations=1)
    for key in ("downtime", "bytes", "passes"):
        benchmark.extra_info[key] = RESULTS[("migrate", mib)][key]
