"""Logging for -v ("what pycr is doing, in kernel terms").

Messages go to stderr so that `pycr show --json` and friends keep stdout clean.
A progress bar on the same terminal (pycr.progress) is erased before each line.
"""

import logging
import sys

from .progress import Progress, clear_line  # noqa: F401  (Progress: its callers import it from here)

log = logging.getLogger("pycr")


def _level(verbosity):
    return {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)


def setup(verbosity, log_file=None, file_verbosity=None):
    """-v shows the steps (seize, inject, copy); -vv adds per-VMA and per-syscall detail.

    With log_file (criu's -o), the narration at file_verbosity goes there, with the seconds
    since pycr started, and the terminal gets errors only.
    """
    handler = _TerminalHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("pycr: %(message)s"))
    handler.setLevel(logging.ERROR if log_file else _level(verbosity))
    handlers = [handler]
    if log_file:
        to_file = logging.StreamHandler(log_file)
        to_file.setFormatter(logging.Formatter("(%(relativeCreated)10.3f ms) %(message)s"))
        to_file.setLevel(_level(file_verbosity))
        handlers.append(to_file)
    log.handlers[:] = handlers
    log.setLevel(min(h.level for h in handlers))
    log.propagate = False


class _TerminalHandler(logging.StreamHandler):
    """stderr's handler: a progress bar's line is erased first, so that log lines stay whole."""

    def emit(self, record):
        clear_line()
        super().emit(record)


def to_file_only(message):
    """Write a line pycr prints on the terminal itself (its error) into the -o log file too."""
    for handler in log.handlers:
        if handler.stream is not sys.stderr:
            handler.stream.write(message + "\n")
            handler.flush()
