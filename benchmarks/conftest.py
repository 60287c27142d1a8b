"""Shared pieces of the pytest-benchmark suites (bench_*.py) and the harness tests.

Run the suites with `python -m pytest benchmarks/ --benchmark-only` (they are not part of
the test suite in tests/). Files named bench_*.py are collected here, so a new suite only
has to be named that way.

Fixtures:
- copy_limits (session): the machine's copy limits, measured once per session in the
  image directory's filesystem; {name: GiB/s median}. PYCR_BENCH_LIMITS_MIB (default 1024)
  and PYCR_BENCH_LIMITS_ROUNDS (default 3) size it; 0 rounds skips it (ratios left out).
- workloads: start memhog trees that are killed by PID and reaped after the test,
  whatever happened.
- images_root: a directory on the benchmark filesystem (PYCR_BENCH_CACHE), emptied after.
Helpers: settle() before each timed phase, reaping_dump() around an in-process dump
that kills the tree, throughput_info() for extra_info.
"""

import os
import shutil
import statistics
import time
from contextlib import contextmanager

import pytest

from benchmarks import limits, procs

MIB = 1 << 20
GIB = 1 << 30
ROUNDS = int(os.environ.get("PYCR_BENCH_ROUNDS", "3"))
PAUSE = float(os.environ.get("PYCR_BENCH_PAUSE", "0.5"))

# short names for the limits a dump or restore is read against
READ_LIMIT = "process_vm_readv, 2 MiB iovecs"
WRITEV_LIMIT = "process_vm_writev into unpopulated memory, 1 iovec"
FILE_LIMIT = "write + fsync of a new file"
DIRECT_LIMIT = "O_DIRECT write + fsync of a new file (pycr's dump path)"
LIMIT_KEYS = {"readv": READ_LIMIT, "writev_fresh": WRITEV_LIMIT, "file_write": FILE_LIMIT,
              "direct_write": DIRECT_LIMIT}


def pytest_collect_file(file_path, parent):
    """Collect benchmarks/bench_*.py as test modules (pytest's default is test_*.py)."""
    if parent.session.isinitpath(file_path):
        return None   # named on the command line: pytest collects it already
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session", autouse=True)
def subreaper():
    """Trees restored detached are re-parented to this process, which reaps them."""
    procs.become_subreaper()


@pytest.fixture(scope="session")
def copy_limits():
    """{limit name: median GiB/s}, measured once in this session; {} when turned off."""
    rounds = int(os.environ.get("PYCR_BENCH_LIMITS_ROUNDS", "3"))
    if rounds <= 0:
        return {}
    size = int(os.environ.get("PYCR_BENCH_LIMITS_MIB", "1024")) * MIB
    raw = limits.measure(size=size, rounds=rounds, image_dir=procs.CACHE / "images", pause=0.3)
    return {name: statistics.median(v) for name, v in raw.items()}


@pytest.fixture
def workloads():
    """start(mib, nproc=1, rate_pct=0) -> a running procs.Workload; all are killed after the test."""
    started = []

    def start(mib, nproc=1, rate_pct=0.0):
        wl = procs.Workload(mib, nproc, rate_pct)
        started.append(wl)
        return wl.start()

    yield start
    left = []
    for wl in started:
        left += wl.kill()
        wl.cleanup()
    assert not left, f"pids {left} did not go away"


@pytest.fixture
def images_root():
    """A fresh directory for image sets on the filesystem the limits are measured on."""
    path = procs.CACHE / "bench-images" / f"{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def settle(next_bytes=0):
    """sync, warm about next_bytes of the VM's free memory, pause (see limits.settle)."""
    limits.settle(PAUSE, next_bytes + 64 * MIB if next_bytes else 0)


@contextmanager
def reaping_dump(wl):
    """Around an in-process dump that kills wl's tree: afterwards every PID must be free.

    pycr, as tracer and here also the tree's parent, reaps the tree itself. No other
    thread may waitpid() the tree meanwhile: waitpid reports ptrace stops to any thread
    of the tracer, so a reaper thread would steal the stops the freeze waits for.
    (compare.py runs pycr as a child process and uses procs.Workload.reap_during instead.)
    """
    yield
    left = procs.reap(wl.pids, timeout=10.0)
    assert not left, f"the dump left pids {left} behind"
    if wl.proc is not None and wl.proc.returncode is None:
        wl.proc.returncode = -9   # reaped by pycr, not by subprocess


def throughput_info(nbytes, seconds, copy_limits, limit_key):
    """extra_info entries: GiB/s and its ratio to the named copy limit of this session."""
    gibps = nbytes / GIB / seconds if seconds > 0 else 0.0
    info = {"bytes": nbytes, "gib_per_s": round(gibps, 3)}
    limit = copy_limits.get(LIMIT_KEYS[limit_key]) if copy_limits else None
    if limit:
        info[f"limit_{limit_key}_gib_per_s"] = round(limit, 3)
        info[f"ratio_to_{limit_key}"] = round(gibps / limit, 3)
    return info


def median(values):
    return statistics.median(values) if values else None
