"""Logging for -v ("what pycr is doing, in kernel terms") and a terminal progress bar.

Messages go to stderr so that `pycr show --json` and friends keep stdout clean.
"""

import logging
import sys
import time

log = logging.getLogger("pycr")


def _level(verbosity):
    return {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)


def setup(verbosity, log_file=None, file_verbosity=None):
    """-v shows the steps (seize, inject, copy); -vv adds per-VMA and per-syscall detail.

    With log_file (criu's -o), the narration at file_verbosity goes there, with the seconds
    since pycr started, and the terminal gets errors only.
    """
    handler = logging.StreamHandler(sys.stderr)
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


def to_file_only(message):
    """Write a line pycr prints on the terminal itself (its error) into the -o log file too."""
    for handler in log.handlers:
        if handler.stream is not sys.stderr:
            handler.stream.write(message + "\n")
            handler.flush()


class Progress:
    """A one-line progress bar on a terminal; silent when stderr is not a tty.

    Long copies (hundreds of MiB) otherwise look like a hang.
    """

    def __init__(self, label, total, unit="MiB", scale=1 << 20, stream=None):
        self.label = label
        self.total = max(total, 1)
        self.unit = unit
        self.scale = scale
        self.done = 0
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() and total >= 32 * scale
        self.started = time.monotonic()
        self._last = 0.0

    def advance(self, n):
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * 30)
            self.stream.write(
                f"\r{self.label} [{bar:<30}] {self.done / self.scale:.0f}/{self.total / self.scale:.0f} {self.unit}"
            )
            self.stream.flush()

    def close(self):
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
