"""Run the `pycr` command as a user would: a separate process, its exit status and stderr."""

import os
import subprocess
import sys
from contextlib import contextmanager


def pycr(*args, timeout=120, expect=0):
    """Run `pycr ARGS`; assert the exit status is `expect` (None: any). Returns CompletedProcess."""
    proc = subprocess.run([sys.executable, "-m", "pycr", *map(str, args)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout, close_fds=True)
    if expect is not None and proc.returncode != expect:
        raise AssertionError(f"pycr {' '.join(map(str, args))} exited {proc.returncode}, expected {expect}\n"
                             f"--- stdout:\n{proc.stdout[-3000:]}\n--- stderr:\n{proc.stderr[-3000:]}")
    return proc


def one_line_error(proc):
    """The error a failed pycr printed: exactly one line, no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line error, got:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("pycr: ")
    return lines[0]


@contextmanager
def stopped_at_step(step, *args, env=None):
    """`pycr ARGS` run with PYCR_STOP_AT_STEP=step (a step's number or name), yielded as (process,
    its first stderr line) once it says it stopped there, for the caller to signal; killed if it is
    still running at the end."""
    env = dict(os.environ, **(env or {}), PYCR_STOP_AT_STEP=str(step))
    p = subprocess.Popen([sys.executable, "-m", "pycr", *map(str, args)], env=env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        first = p.stderr.readline()
        number = f"{step} " if isinstance(step, int) else ""
        assert first.startswith(f"pycr: stopped at step {number}"), first + p.stderr.read()
        yield p, first
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=60)
