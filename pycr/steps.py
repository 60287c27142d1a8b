"""Named steps of pycr's work on a tree, where a test can stop pycr to kill it.

Every step that leaves the tree in a new state calls step(name). With
PYCR_STOP_AT_STEP=N (or a step name) in the environment, pycr announces the
N-th step on stderr and waits there for a signal: SIGKILL ends it on the
spot; SIGINT, SIGTERM or SIGHUP are then raised as if they had arrived at
that instant (held until pycr unblocks them, if it blocks them there). With
PYCR_COUNT_STEPS=FILE, pycr appends each step's number and name to FILE, so
a test knows how many steps a command has.

Without those variables a step costs one dictionary lookup.
"""

import contextlib
import os
import signal
import sys

_STOP_AT = os.environ.get("PYCR_STOP_AT_STEP")
_COUNT_FILE = os.environ.get("PYCR_COUNT_STEPS")
_WAKE = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
_count = 0
#: Set once the running command's work is complete: a stop signal after that undoes nothing.
finished = False
outcome = ""            # what the complete command left, for the line a late stop signal gets
_command = None


def begin(command):
    """The command pycr runs ("dump", "pre-dump", "restore", "migrate")."""
    global _command, finished
    _command, finished = command, False


def finish(what, left=""):
    """The work `what` is complete (`left`: what it leaves, e.g. "the tree was killed").
    It completes the command only if it is the command itself: a migration's
    pre-dump passes do not complete the migration."""
    global finished, outcome
    if what == _command:
        finished, outcome = True, left


@contextlib.contextmanager
def deferred_signals():
    """Hold SIGINT, SIGTERM and SIGHUP for the block: what it does to a task is
    done whole or not at all, and the rollback they trigger starts after it."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, _WAKE)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def step(name):
    """Mark that pycr reached the step `name`."""
    if _STOP_AT is None and _COUNT_FILE is None:
        return
    global _count
    _count += 1
    if _COUNT_FILE:
        with open(_COUNT_FILE, "a") as f:
            f.write(f"{_count} {name}\n")
    if _STOP_AT in (str(_count), name):
        _hold(name)


def _hold(name):
    before = signal.pthread_sigmask(signal.SIG_BLOCK, _WAKE)
    print(f"pycr: stopped at step {_count} ({name})", file=sys.stderr, flush=True)
    signum = signal.sigwait(_WAKE)
    os.kill(os.getpid(), signum)          # pending now; delivered where pycr allows it
    signal.pthread_sigmask(signal.SIG_SETMASK, before)
