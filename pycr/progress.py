"""The terminal progress bar of a long step: bytes done/total, rate, time left.

One bar per command step over the whole tree (a dump's page copy, a pre-dump's,
a restore's fill, each pass of a migration), not one per process: a tree of 16
processes of 10 MiB is one 160 MiB step. The command opens the step
(`with step("dump"):`), declares its total when it is known before the first
byte moves (`total(n)`: then the bar shows the time left), and every per-process
copier (`Progress`) inside it feeds that one bar. Without a declared total the
bar shows bytes and rate only: a total that grows as processes are reached
would give a wrong estimate.

Shown only on a terminal (stderr a tty), when the step moves at least THRESHOLD
bytes, and unless the CLI turned it off (-q). A log line printed to the terminal
meanwhile (-v) first clears the bar's line (clear_line), and the bar is drawn
again below it at its next redraw. A finished step leaves its last line
(100%, the rate) ended by a newline; a failed one is erased, so that the error
stands alone.
"""

import os
import sys
import time
from contextlib import contextmanager

THRESHOLD = 32 << 20        # bytes: a step moving less is over before a bar would help
REDRAW = 0.1                # seconds between redraws, at most (but a newly filled cell is drawn at once)
BAR_WIDTH = 24
ERASE = "\r\x1b[K"          # carriage return, erase to the end of the line

_allowed = True             # False: -q (nothing on the terminal but errors)
_current = None             # the Bar of the step in progress


def allow(on):
    """The CLI's switch: -q turns every bar off."""
    global _allowed
    _allowed = bool(on)


def _size(n, unit):
    return f"{n / unit:.1f}"


def _unit(n):
    return (1 << 30, "GiB") if n >= 1 << 30 else (1 << 20, "MiB")


def _rate(bps):
    scale, name = _unit(bps)
    return f"{bps / scale:.{0 if scale == 1 << 20 and bps >= 100 << 20 else 1}f} {name}/s"


def _clock(seconds):
    seconds = int(seconds + 0.5)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Bar:
    """One line on the terminal for one step."""

    def __init__(self, label, total=None, stream=None, muted=False):
        self.label = label
        self.stream = stream or sys.stderr
        self.total = total          # None: not known before the copy
        self.done = 0
        self.started = time.monotonic()
        self.muted = muted
        self.tty = not muted and _allowed and _isatty(self.stream)
        self.drawn = False          # the bar's text is on the current line
        self.shown = False          # the bar was drawn at least once
        self._last = 0.0
        self._drawn_cells = None

    # -- what the step's copiers call
    def set_total(self, n):
        """The step's whole total, known before its first byte moves: the time left can be shown."""
        if self.done == 0:
            self.total = n
            self.started = time.monotonic()

    def advance(self, n):
        self.done += n
        if not self.visible():
            return
        now = time.monotonic()
        if now - self._last >= REDRAW or not self.drawn or self._cells() != self._drawn_cells:
            self._last = now
            self.draw(now)

    def _cells(self):
        """The '#' of the bar (None without a total): a change is drawn at once, so that a short
        step's bar still moves (at most BAR_WIDTH extra redraws)."""
        if not self.total:
            return None
        return int(min(self.done / self.total, 1.0) * BAR_WIDTH)

    def visible(self):
        if not self.tty:
            return False
        return (self.total if self.total is not None else self.done) >= THRESHOLD

    # -- the line
    def line(self, now=None):
        elapsed = (now or time.monotonic()) - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        scale, unit = _unit(self.total if self.total is not None else self.done)
        speed = _rate(rate) if self.done and elapsed > 0 else f"-- {unit}/s"
        if self.total is None:
            return f"{self.label} {_size(self.done, scale)} {unit}  {speed}"
        frac = min(self.done / self.total, 1.0) if self.total else 1.0
        filled = int(frac * BAR_WIDTH)
        left = max(self.total - self.done, 0)
        if not left:
            eta = "0:00 left"
        elif rate > 0:
            eta = f"{_clock(left / rate)} left"
        else:
            eta = "--:-- left"
        return (f"{self.label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] "
                f"{_size(min(self.done, self.total), scale)}/{_size(self.total, scale)} {unit}  {speed}  {eta}")

    def draw(self, now=None):
        text = self.line(now)
        width = _columns(self.stream)
        if width:
            text = text[:width - 1]         # a wrapped line could not be redrawn in place
        self.stream.write(ERASE + text)
        self.stream.flush()
        self.drawn = self.shown = True
        self._drawn_cells = self._cells()

    def clear(self):
        if self.drawn:
            self.stream.write(ERASE)
            self.stream.flush()
            self.drawn = False
            self._last = 0.0                # drawn again at the next advance

    def close(self, ok=True):
        """Success: the last state (the total reached, its rate) stays on its own line.
        Failure: the line is erased."""
        if not self.tty:
            return
        if ok and (self.shown or self.visible()):
            self.draw()
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False
        else:
            self.clear()


def _isatty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _columns(stream):
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 0


@contextmanager
def step(label, stream=None):
    """The bar of one command step; a step opened inside another joins it (one bar)."""
    global _current
    if _current is not None:
        yield _current
        return
    bar = _current = Bar(label, stream=stream)
    ok = False
    try:
        yield bar
        ok = True
    finally:
        _current = None
        bar.close(ok)


@contextmanager
def muted():
    """No bar for what runs inside (work whose bytes another bar already counted)."""
    global _current
    if _current is not None:
        yield _current
        return
    bar = _current = Bar("", muted=True)
    try:
        yield bar
    finally:
        _current = None


def total(n):
    """Declare the current step's total bytes (before its copy starts)."""
    if _current is not None:
        _current.set_total(n)


def advance(n):
    """Count n bytes done in the current step, if one is open."""
    if _current is not None:
        _current.advance(n)


def clear_line():
    """Erase the bar before another line is printed to the terminal (a log line)."""
    if _current is not None:
        _current.clear()


class Progress:
    """One process's copy. Inside a step it feeds the step's bar; alone it is
    its own bar (label and total of that copy), shown as a step would be."""

    def __init__(self, label, total, unit="MiB", scale=1 << 20, stream=None):
        # unit and scale: the old per-process bar's, still accepted; the bar picks MiB or GiB itself
        global _current
        self.step = _current
        self.own = None
        if self.step is None:
            self.own = _current = Bar(label, total, stream=stream)

    @property
    def enabled(self):
        bar = self.own or self.step
        return bar.visible() and not bar.muted

    def advance(self, n):
        (self.own or self.step).advance(n)

    def close(self, ok=True):
        global _current
        if self.own is not None:
            _current = None
            self.own.close(ok)
            self.own = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(exc_type is None)
