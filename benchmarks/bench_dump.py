"""pycr dump and restore of still memory: 64 MiB, 512 MiB, 2 GiB, and 512 MiB over a 16-process tree.

Run: python -m pytest benchmarks/bench_dump.py --benchmark-only [--benchmark-json FILE]
(PYCR_BENCH_ROUNDS, default 3; PYCR_BENCH_DUMP_WORKLOADS="64 512 2048 512x16").

Each round starts its own memhog tree, syncs and warms the VM's free memory before the
timed phase (see limits.settle), and kills what it started by PID. extra_info per
benchmark: per-round seconds, frozen seconds (dump: freeze until the kill begins; and
pycr's own figure, which adds the wait until the killed tree's PIDs are free), bytes of pages, GiB/s and its ratio
to the copy limits measured in the same session. Every restore is checked like a user
would: same PIDs running, same memory checksum as before the dump.
"""

import os
import shutil
import time

import pytest

from benchmarks import procs
from benchmarks.compare import dir_size, parse_workload, workload_label
from benchmarks.conftest import MIB, ROUNDS, median, reaping_dump, settle, throughput_info
from benchmarks.pycr_runs import full_dump, timed_restore

WORKLOADS = os.environ.get("PYCR_BENCH_DUMP_WORKLOADS", "64 512 2048 512x16").split()


@pytest.mark.parametrize("spec", WORKLOADS, ids=lambda s: workload_label(*parse_workload(s)).replace(" ", ""))
def test_dump(benchmark, spec, workloads, images_root, copy_limits):
    mib, nproc = parse_workload(spec)
    seen = {"frozen": [], "frozen_with_kill": [], "total": [], "bytes": [], "image": []}
    state = {}

    def setup():
        images = images_root / f"dump-{time.monotonic_ns()}"
        state["wl"], state["images"] = workloads(mib, nproc), images
        settle(mib * MIB)   # the dump allocates page cache for about mib
        return (), {}

    def dump():
        with reaping_dump(state["wl"]):
            stats = full_dump(state["wl"].root, state["images"])
        seen["frozen"].append(stats.until_release_seconds)
        seen["frozen_with_kill"].append(stats.frozen_seconds)
        seen["total"].append(stats.total_seconds)
        seen["bytes"].append(stats.pages_bytes)
        seen["image"].append(dir_size(state["images"]))
        shutil.rmtree(state["images"], ignore_errors=True)

    benchmark.pedantic(dump, setup=setup, rounds=ROUNDS, iterations=1)
    assert min(seen["bytes"]) >= mib * MIB * 0.99, "every page of the workload is in the image"
    info = benchmark.extra_info
    info.update(workload=spec, nproc=nproc, mib=mib, total_s=seen["total"], frozen_s=seen["frozen"],
                frozen_median_s=median(seen["frozen"]), frozen_with_kill_s=seen["frozen_with_kill"],
                image_bytes=median(seen["image"]))
    info.update(throughput_info(median(seen["bytes"]), median(seen["total"]), copy_limits, "direct_write"))
    for key in ("readv", "file_write"):
        extra = throughput_info(median(seen["bytes"]), median(seen["total"]), copy_limits, key)
        info.update({k: v for k, v in extra.items() if k.startswith(("ratio_", "limit_"))})


@pytest.mark.parametrize("spec", WORKLOADS, ids=lambda s: workload_label(*parse_workload(s)).replace(" ", ""))
def test_restore(benchmark, spec, workloads, images_root, copy_limits):
    mib, nproc = parse_workload(spec)
    seen = {"seconds": [], "bytes": [], "bad": []}
    state = {}

    def setup():
        images = images_root / f"restore-{time.monotonic_ns()}"
        wl = workloads(mib, nproc)
        state.update(wl=wl, images=images, before=wl.checksums())
        with reaping_dump(wl):
            stats = full_dump(wl.root, images)
        seen["bytes"].append(stats.pages_bytes)
        settle(mib * MIB)   # the restore allocates the tree's memory
        return (), {}

    def restore():
        seen["seconds"].append(timed_restore(state["images"]))

    def teardown(*_args, **_kwargs):
        wl = state["wl"]
        after = wl.checksums() if wl.alive() else {}
        if {p: c for p, (_, c) in after.items()} != {p: c for p, (_, c) in state["before"].items()}:
            seen["bad"].append(f"pids {wl.pids}: running {wl.alive()}, checksums differ or missing")
        wl.kill()
        shutil.rmtree(state["images"], ignore_errors=True)

    benchmark.pedantic(restore, setup=setup, teardown=teardown, rounds=ROUNDS, iterations=1)
    assert not seen["bad"], seen["bad"]
    info = benchmark.extra_info
    info.update(workload=spec, nproc=nproc, mib=mib, restore_s=seen["seconds"])
    info.update(throughput_info(median(seen["bytes"]), median(seen["seconds"]), copy_limits, "writev_fresh"))


def test_workload_pids_are_free_after_a_dump(workloads, images_root):
    """The suites rely on this: a dump kills the tree and its PIDs are free for the restore."""
    wl = workloads(4)
    with reaping_dump(wl):
        full_dump(wl.root, images_root / "d")
    assert procs.state(wl.root) is None
