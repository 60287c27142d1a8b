"""Incremental dumps of a busy process: pre-dump passes, the final dump, and the tracker scans.

Run: python -m pytest benchmarks/bench_predump.py --benchmark-only [--benchmark-json FILE]

test_chain (2 GiB memhog rewriting 1 % of its pages per second; PYCR_BENCH_CHAIN_MIB):
  each round starts a fresh process, lets it run 1 s, takes a full dump of it that leaves
  it running (the reference), then PREDUMPS pre-dump passes PASS_INTERVAL s apart and the
  final dump (--prev-images-dir the last pass). The timed call is the final dump. Then the
  chain is restored and must come back running. extra_info: frozen seconds (freeze until
  the thaw or kill begins, see benchmarks.pycr_runs) and bytes of
  the reference, of every pre-dump pass and of the final dump, and final/full frozen.
test_scan: one tracker scan of a 64 MiB, 512 MiB and 2 GiB process that writes 1 % of its
  pages per second. uffd-wp: one PAGEMAP_SCAN (report written pages, write-protect them
  again) over the region, on the userfaultfd a pre-dump left in the process. hash: read the
  region through /proc/PID/mem and hash every page, as the hash tracker does every pass.
  extra_info: seconds per GiB, dirty pages found.
Speed is not asserted; every process started here is killed by PID.
"""

import os
import shutil
import time

import pytest

from benchmarks import procs
from benchmarks.compare import dir_size
from benchmarks.conftest import GIB, MIB, ROUNDS, median, reaping_dump, settle
from benchmarks.pycr_runs import full_dump, incremental_pass, timed_restore
from pycr.images import ImageDir
from pycr.native import core
from pycr.trackers.runs import total
from pycr.trackers.uffd import UffdProcess

CHAIN_MIB = int(os.environ.get("PYCR_BENCH_CHAIN_MIB", "2048"))
SCAN_MIB = [int(x) for x in os.environ.get("PYCR_BENCH_SCAN_MIB", "64 512 2048").split()]
RATE_PCT = 1.0
PREDUMPS = int(os.environ.get("PYCR_BENCH_PREDUMPS", "3"))
PASS_INTERVAL = float(os.environ.get("PYCR_BENCH_PASS_INTERVAL", "1.0"))
SCAN_ROUNDS = int(os.environ.get("PYCR_BENCH_SCAN_ROUNDS", "5"))
HASH_CHUNK = 32 * MIB


@pytest.mark.parametrize("tracker", ["uffd-wp", "hash"])
def test_chain(benchmark, tracker, workloads, images_root):
    seen = {"full_frozen": [], "final_frozen_with_kill": [], "full_bytes": [], "pre_frozen": [], "pre_bytes": [], "pre_total": [],
            "final_frozen": [], "final_bytes": [], "final_total": [], "restore_s": [], "chain_bytes": [],
            "bad": []}
    state = {}

    def setup():
        base = images_root / f"chain-{time.monotonic_ns()}"
        wl = workloads(CHAIN_MIB, rate_pct=RATE_PCT)
        state.update(wl=wl, base=base)
        time.sleep(1.0)
        settle(CHAIN_MIB * MIB)
        ref = full_dump(wl.root, base / "full", leave_running=True)
        seen["full_frozen"].append(ref.until_release_seconds)
        seen["full_bytes"].append(ref.pages_bytes)
        shutil.rmtree(base / "full")
        frozen, written, totals, prev = [], [], [], None
        for n in range(1, PREDUMPS + 1):
            settle(CHAIN_MIB * MIB if n == 1 else 0)
            if n > 1:
                time.sleep(max(PASS_INTERVAL - 0.5, 0))
            st = incremental_pass(wl.root, base / f"pre{n}", prev=prev, tracker=tracker)
            frozen.append(st.until_release_seconds)
            written.append(st.pages_bytes)
            totals.append(st.total_seconds)
            prev = base / f"pre{n}"
        seen["pre_frozen"].append(frozen)
        seen["pre_bytes"].append(written)
        seen["pre_total"].append(totals)
        state["prev"] = prev
        time.sleep(PASS_INTERVAL)
        return (), {}

    def final():
        with reaping_dump(state["wl"]):
            st = incremental_pass(state["wl"].root, state["base"] / "final", prev=state["prev"],
                                  pre_dump=False, tracker=tracker)
        seen["final_frozen"].append(st.until_release_seconds)
        seen["final_frozen_with_kill"].append(st.frozen_seconds)
        seen["final_bytes"].append(st.pages_bytes)
        seen["final_total"].append(st.total_seconds)

    def teardown(*_args, **_kwargs):
        wl, base = state["wl"], state["base"]
        seen["chain_bytes"].append(dir_size(base))
        try:
            settle(CHAIN_MIB * MIB)
            seen["restore_s"].append(timed_restore(base / "final"))
            first = wl.checksums(timeout=20)
            time.sleep(0.1)
            second = wl.checksums(timeout=20)
            if not wl.alive() or len(second) != len(wl.pids) or \
                    any(second[p][0] <= first.get(p, (1 << 62,))[0] for p in wl.pids):
                seen["bad"].append(f"restored chain: pids {wl.pids} not all back and running")
        except Exception as exc:  # noqa: BLE001 - recorded and asserted after the rounds
            seen["bad"].append(f"restore of the chain failed: {exc}")
        finally:
            wl.kill()
            shutil.rmtree(base, ignore_errors=True)

    benchmark.pedantic(final, setup=setup, teardown=teardown, rounds=ROUNDS, iterations=1)
    assert not seen["bad"], seen["bad"]
    assert min(seen["full_bytes"]) >= CHAIN_MIB * MIB * 0.99
    full, fin = median(seen["full_frozen"]), median(seen["final_frozen"])
    benchmark.extra_info.update(
        tracker=tracker, mib=CHAIN_MIB, rate_pct=RATE_PCT, predumps=PREDUMPS, pass_interval_s=PASS_INTERVAL,
        full_frozen_s=seen["full_frozen"], full_bytes=seen["full_bytes"],
        predump_frozen_s=seen["pre_frozen"], predump_bytes=seen["pre_bytes"], predump_total_s=seen["pre_total"],
        final_frozen_s=seen["final_frozen"], final_frozen_with_kill_s=seen["final_frozen_with_kill"],
        final_bytes=seen["final_bytes"], final_total_s=seen["final_total"],
        chain_image_bytes=seen["chain_bytes"], chain_restore_s=seen["restore_s"],
        final_over_full_frozen=round(fin / full, 4) if full else None)


def _uffd_scanner(wl, images_root):
    """Arm uffd-wp tracking in wl with one pre-dump; -> (scan(), close())."""
    pre = images_root / "pre1"
    incremental_pass(wl.root, pre, tracker="uffd-wp")
    target_fd = ImageDir(str(pre)).read("tracker", wl.root).uffd_fd
    pidfd = core.pidfd_open(wl.root)
    try:
        uffd = UffdProcess(wl.root, target_fd, core.pidfd_getfd(pidfd, target_fd), created=False)
    finally:
        os.close(pidfd)
    start = procs.find_region(wl.root, wl.mib * MIB)
    end = start + wl.mib * MIB
    return (lambda: total(uffd.scan_written(start, end)) // 4096), uffd.close


def _hash_scanner(wl):
    """Read and hash the workload's region like the hash tracker; -> (scan(), close())."""
    start = procs.find_region(wl.root, wl.mib * MIB)
    size = wl.mib * MIB
    mem = os.open(f"/proc/{wl.root}/mem", os.O_RDONLY)

    def scan():
        hashed = 0
        for off in range(0, size, HASH_CHUNK):
            data = os.pread(mem, min(HASH_CHUNK, size - off), start + off)
            hashed += len(core.hash_pages(data, len(data) // 4096))
        return hashed

    return scan, lambda: os.close(mem)


@pytest.mark.parametrize("mib", SCAN_MIB, ids=lambda m: f"{m}MiB")
@pytest.mark.parametrize("tracker", ["uffd-wp", "hash"])
def test_scan(benchmark, tracker, mib, workloads, images_root):
    wl = workloads(mib, rate_pct=RATE_PCT)
    scan, close = _uffd_scanner(wl, images_root) if tracker == "uffd-wp" else _hash_scanner(wl)
    found = []
    try:
        benchmark.pedantic(lambda: found.append(scan()), setup=lambda: time.sleep(0.5),
                           rounds=SCAN_ROUNDS, iterations=1)
    finally:
        close()
    if tracker == "hash":
        assert set(found) == {mib * MIB // 4096}, "every page is hashed"
    else:
        assert all(0 < n < mib * MIB // 4096 for n in found), "some, not all, pages were written"
    secs = benchmark.stats.stats.median
    benchmark.extra_info.update(tracker=tracker, mib=mib, pages_reported=found,
                                seconds_per_gib=round(secs / (mib * MIB / GIB), 5))
