"""Downtime of `pycr migrate` against a plain dump followed by a restore of the same workload.

Run: python -m pytest benchmarks/bench_migrate.py --benchmark-only -s
(PYCR_BENCH_MIGRATE_MIB="256 2048" chooses the sizes, default 256; PYCR_BENCH_ROUNDS rounds.)
The workload is memhog rewriting 1 % of its pages every second, started fresh for every
round and left running for 1 s first.

- test_dump_then_restore: the timed call is `dump` (tree frozen, then killed) followed by
  `restore --pidns -d`; all of it is downtime.
- test_migrate: the timed call is the whole migration, during most of which the source
  runs; extra_info has its downtime (source frozen -> replica running), the bytes moved
  and the number of passes.
Nothing about speed is asserted. With -s, a table compares the two per size at the end.
Replicas are killed through their namespace's init, by PID.
"""

import os
import shutil
import statistics
import time

import pytest

from benchmarks import procs
from benchmarks.conftest import MIB, ROUNDS, median, reaping_dump, settle
from pycr.dump import dump_tree
from pycr.migrate import migrate
from pycr.migrate.loop import Policy
from pycr.native import core
from pycr.restore.restorer import restore

SIZES = [int(x) for x in os.environ.get("PYCR_BENCH_MIGRATE_MIB", "256").split()]
RATE_PCT = 1.0
WARM_SECONDS = 1.0
RESULTS = {}


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    reporter.write_line("")
    reporter.write_line(f"migration downtime vs dump + restore (memhog, {RATE_PCT:g} % of pages per second)")
    for mib in sorted({k[1] for k in RESULTS}):
        plain, mig = RESULTS.get(("plain", mib)), RESULTS.get(("migrate", mib))
        if not plain or not mig:
            continue
        p, d = median(plain["downtime"]), median(mig["downtime"])
        reporter.write_line(
            f"{mib:>5} MiB: dump+restore {p:.3f} s ({median(plain['bytes']) / MIB:.0f} MiB); "
            f"migrate downtime {d:.3f} s ({min(mig['downtime']):.3f}-{max(mig['downtime']):.3f}) = "
            f"{d / p:.1%} of it; migration {median(mig['total']):.2f} s, "
            f"{median(mig['bytes']) / MIB:.0f} MiB moved in {median(mig['passes']):.0f} passes")


def _stub_children():
    """Our children that run the restore stub: the init of a replica's PID namespace."""
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


def _record(kind, mib, **values):
    slot = RESULTS.setdefault((kind, mib), {})
    for key, value in values.items():
        slot.setdefault(key, []).append(value)


def _kill_replicas(before):
    """Kill every namespace init started since `before` (the namespace dies with it) and reap it."""
    left = procs.kill_pids(sorted(_stub_children() - before))
    assert not left, f"replica inits {left} did not go away"


@pytest.mark.parametrize("mib", SIZES)
def test_dump_then_restore(benchmark, mib, workloads, images_root):
    state = {}

    def setup():
        state["wl"] = workloads(mib, rate_pct=RATE_PCT)
        state["images"] = images_root / f"img-{time.monotonic_ns()}"
        state["before"] = _stub_children()
        time.sleep(WARM_SECONDS)
        settle(mib * MIB)
        return (), {}

    def dump_and_restore():
        started = time.monotonic()
        with reaping_dump(state["wl"]):
            dump_tree(state["wl"].root, str(state["images"]))
        restore(str(state["images"]), detach=True, pidns=True)
        _record("plain", mib, downtime=time.monotonic() - started, bytes=_dir_bytes(state["images"]))

    def teardown(*_args, **_kwargs):
        _kill_replicas(state["before"])
        shutil.rmtree(state["images"], ignore_errors=True)

    benchmark.pedantic(dump_and_restore, setup=setup, teardown=teardown, rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update(downtime_s=RESULTS[("plain", mib)]["downtime"],
                                bytes=RESULTS[("plain", mib)]["bytes"])


@pytest.mark.parametrize("mib", SIZES)
def test_migrate(benchmark, mib, workloads, images_root):
    state = {}

    def setup():
        state["wl"] = workloads(mib, rate_pct=RATE_PCT)
        state["work"] = images_root / f"work-{time.monotonic_ns()}"
        state["before"] = _stub_children()
        time.sleep(WARM_SECONDS)
        settle(mib * MIB)
        return (), {}

    def run():
        started = time.monotonic()
        with reaping_dump(state["wl"]):
            res = migrate(state["wl"].root, work_dir=state["work"], policy=Policy())
        _record("migrate", mib, total=time.monotonic() - started, downtime=res.summary.downtime,
                bytes=res.summary.total_bytes, passes=res.summary.passes,
                final_source=res.reports[-1].source_seconds, final_replica=res.reports[-1].apply_seconds)

    def teardown(*_args, **_kwargs):
        _kill_replicas(state["before"])
        shutil.rmtree(state["work"], ignore_errors=True)

    benchmark.pedantic(run, setup=setup, teardown=teardown, rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update({f"{k}": v for k, v in RESULTS[("migrate", mib)].items()})
    benchmark.extra_info["downtime_median_s"] = statistics.median(RESULTS[("migrate", mib)]["downtime"])
