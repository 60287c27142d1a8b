"""Run a command as its child subreaper, reaping the orphans of its tree at once.

Usage: python3 scripts/reaper.py COMMAND [ARGS...]; exits as COMMAND does.

A process whose parent dies is re-parented to the nearest ancestor that is a
child subreaper (prctl PR_SET_CHILD_SUBREAPER), else to init; once dead it
keeps its PID, as a zombie, until that process reaps it. Tests kill restored
trees, whose parent (pycr) is gone, and wait until their PIDs are free; an
init that reaps only now and then (some container and VM inits do it every
second or two) makes every such wait last until its next round. This process
reaps them as they die, like `docker run --init`. Only the orphans come here:
the command's own children stay its own.
"""

import ctypes
import os
import signal
import sys

PR_SET_CHILD_SUBREAPER = 36


def main(argv):
    if not argv:
        sys.exit(__doc__.split("\n\n")[1])
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.exit(f"reaper: PR_SET_CHILD_SUBREAPER: {os.strerror(ctypes.get_errno())}")
    child = os.fork()
    if child == 0:
        try:
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    # Passed on to the command; a Ctrl-C reaches it from the terminal already.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: os.kill(child, signum))
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
