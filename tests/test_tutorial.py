"""docs/tutorial.md runs as written.

Every `$ command` of the tutorial is run in order in an empty directory (tests/tutorial_run.py),
must exit 0 and print what the tutorial shows, up to numbers, addresses and PIDs. Then what the
tutorial claims is checked on the program itself: through dump, restore, a pre-dump chain and a
migration, its log counts on without a gap or a restart, under one PID, and the eventfd in the
dump held the count the program had reached.
"""

import json
import os
import re

import pytest

import procutil
import tutorial_run

pytestmark = pytest.mark.time_limit(90)

_LOG_LINE = re.compile(r"^pid (\d+) count (\d+)$")


def _log(workdir):
    """(pid, count) of every complete line of the counter's log."""
    with open(os.path.join(workdir, "counter.log")) as f:
        text = f.read()
    lines = text.split("\n")[:-1]
    parsed = [_LOG_LINE.match(line) for line in lines]
    assert all(parsed), f"counter.log has lines the program does not write: {lines}"
    return [(int(m.group(1)), int(m.group(2))) for m in parsed]


def _mismatch(result):
    return (f"{result.command!r}: output differs from the tutorial's\n--- tutorial:\n"
            + "\n".join(result.step.expected) + "\n--- now:\n" + "\n".join(result.output))


def test_includes_are_the_files():
    with open(tutorial_run.DOC) as f:
        tutorial = tutorial_run.parse(f.read())
    assert tutorial.includes, "the tutorial shows the program's source"
    for include in tutorial.includes:
        shown = tutorial.lines[include.first:include.end]
        assert shown == tutorial_run.include_text(include), \
            f"docs/tutorial.md shows an old {include.path}: run python tests/tutorial_run.py --write"


def test_tutorial_runs_as_written(tmp_path, cleanup_pids):
    with open(tutorial_run.DOC) as f:
        tutorial = tutorial_run.parse(f.read())
    commands = [step.command for step in tutorial.steps]
    assert any(c.startswith("pycr migrate") for c in commands), commands
    workdir = str(tmp_path / "tutorial")
    os.mkdir(workdir)
    tutorial_run.prepare(workdir)
    pids = {}
    seen = {}       # what some steps printed or left, for the checks after the run
    try:
        for result in tutorial_run.run_steps(tutorial, workdir, pids):
            if result.skipped:
                continue
            assert result.returncode == 0, \
                f"{result.command!r} exited {result.returncode}:\n" + "\n".join(result.output)
            assert result.alignment is not None, _mismatch(result)
            if re.match(r"pycr dump .*-D dump\b", result.command):
                seen["count at dump"] = _log(workdir)[-1][1]
            elif result.command.startswith("pycr show dump/eventfd.img --json"):
                seen["eventfd"] = json.loads("\n".join(result.output))["body"]["eventfds"]
    finally:
        # the counter and the replica: the PIDs the tutorial's own commands name
        ours = tutorial_run.named_pids(tutorial, pids).values()
        cleanup_pids.add(*(int(p) for p in ours if procutil.exists(int(p))))

    log = _log(workdir)
    counter_pid = log[0][0]
    assert {pid for pid, _ in log} == {counter_pid}, "one PID throughout, in the replica's namespace too"
    counts = [count for _, count in log]
    assert counts == list(range(1, len(counts) + 1)), \
        f"the count goes on from where it stopped, never restarting or skipping: {counts}"
    assert seen["eventfd"] == [{"file_id": 3, "count": seen["count at dump"], "semaphore": False}]


def test_every_section_runs_here():
    """A section that needs a command this pycr lacks is skipped by the run above; say which."""
    with open(tutorial_run.DOC) as f:
        tutorial = tutorial_run.parse(f.read())
    reasons = sorted({tutorial_run.missing(step.requires) for step in tutorial.steps} - {None})
    if reasons:
        pytest.skip("; ".join(reasons))
