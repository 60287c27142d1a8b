"""When a migration stops pre-copying, and when it throttles the source: pure arithmetic.

Nothing here knows where the bytes go (a directory, a replica on this host,
a socket): the caller measures each pass and hands over its figures
(PassFigures); the Policy answers with a Decision. The rules are QEMU's:

- bandwidth: the pass's bytes over the seconds spent copying and applying
  them (for a link: sending them), bytes-weighted over the last three passes;
- dirty rate: bytes a pass copied over the time since the previous pass froze
  the tree (what the tree wrote, counted once per page, in that interval);
- fixed cost of the final pass: what a pass costs beyond its copy from the
  freeze on (/proc, registers, images, the replica's reshaping; not the
  wait for the tree to stop, which it runs through), measured on the
  pre-dumps after the first (which also builds the replica), the largest of
  the last two; the final pass does a little more (files, registers, finish),
  which the summary's measured downtime shows;
- remaining bytes: the last dirty rate times the time since the last freeze
  (capped at the first, full pass);
- switch when fixed cost + remaining / bandwidth <= the downtime limit.
Without a limit, the older rules stand (a delta of at most min_delta bytes,
or threshold % of the first pass, or a delta that stopped shrinking): they
already end the passes, and scripts that never asked for a budget keep
their behaviour. max_passes bounds everything; at the limit the final dump
is taken anyway (the summary says by how much the budget was missed), or,
with give_up, the migration stops and the source goes on.

Auto-converge: with a limit, when a pass dirtied memory faster than half
the bandwidth (QEMU's throttle-trigger-threshold: each pass could then at
best halve what remains) and the budget is not met, the tree is throttled.
The throttle is aimed from measurement, not stepped: the last pass's bytes
over the CPU seconds the tree used while dirtying them give what the tree
dirties per second of CPU; the quota is the CPU that brings its dirty rate
down to the aim:

    quota (CPUs) = aim / (bytes dirtied / CPU seconds used)
                 = CPU use x aim / dirty rate,

with aim = AIM_FRACTION x bandwidth, or less when the budget asks for less
(aim_rate). It is set as soon as a pass is taken (throttle_after), before
the pass is sent: it then holds over the whole interval the next pass
counts, and its effect is measured one pass later. The throttle is given as
the % of the tree's unthrottled CPU use taken away (clamped to MAX_PERCENT).
While the budget is not met it never relaxes. A measure taken while the tree
rewrote the same pages undercounts what it dirties per CPU second: when the
pass did not shrink (SATURATED) the share of CPU left is halved, and when a
throttled pass still dirtied more than its aim it is at least half the one
that pass ran under. QEMU's steps (20 %, then +10 % per pass) remain the fallback
when a rate is not measurable (no CPU measure, no bandwidth yet).
"""

import math
from dataclasses import dataclass, field

DEFAULT_MAX_PASSES = 8
DEFAULT_MIN_DELTA = 1 << 20
TRIGGER = 0.5           # QEMU's throttle-trigger-threshold (50 %)
FIRST_PERCENT = 20      # QEMU's cpu-throttle-initial
STEP_PERCENT = 10       # QEMU's cpu-throttle-increment
MAX_PERCENT = 99
RATE_WINDOW = 3         # passes the bandwidth is averaged over
SATURATED = 0.9        # a pass with this share of the previous one's bytes did not shrink
AIM_FRACTION = 0.25     # a throttled tree dirties at most this share of the bandwidth: each pass a quarter of the last


@dataclass
class PassFigures:
    """What one pass measured."""
    number: int
    final: bool
    bytes: int                  # page bytes copied
    seconds: float              # the whole pass: source and destination
    copy_seconds: float         # of which copying/sending and applying the bytes
    frozen_at: float            # monotonic time the pass froze the tree
    dirty_seconds: float = 0.0  # since the previous pass froze the tree (0 for the first)
    throttle: int = 0           # % in force while these bytes were dirtied
    bandwidth_limit: float = None
    cpu_seconds: float = None   # CPU the tree used while it dirtied these bytes (None: not measured)
    to_freeze: float = 0.0      # of `seconds`, before the tree was frozen (a throttled thread's wait
                                # for its quota to reach its stop): the tree still runs, no downtime

    @property
    def fixed_seconds(self):
        return max(self.seconds - self.copy_seconds - self.to_freeze, 0.0)

    @property
    def bandwidth(self):
        """bytes/s of this pass's copy, None if it copied too little to tell."""
        if self.bytes <= 0 or self.copy_seconds <= 0:
            return None
        rate = self.bytes / self.copy_seconds
        return min(rate, self.bandwidth_limit) if self.bandwidth_limit else rate

    @property
    def dirty_rate(self):
        return self.bytes / self.dirty_seconds if self.dirty_seconds > 0 else None

    @property
    def cores(self):
        """CPUs the tree used over the dirty interval, None if not measured."""
        if self.cpu_seconds is None or self.dirty_seconds <= 0:
            return None
        return self.cpu_seconds / self.dirty_seconds

    @property
    def dirty_per_cpu(self):
        """bytes the tree dirtied per second of CPU it ran, None if not measurable."""
        if not self.cpu_seconds or self.cpu_seconds <= 0 or self.bytes <= 0 or self.dirty_seconds <= 0:
            return None
        return self.bytes / self.cpu_seconds


@dataclass
class Decision:
    final: bool
    throttle: int                       # % for the passes from now on
    expected: float = None              # expected downtime (s) of a final pass taken now
    missed: bool = False                # final for the pass limit, with the budget not met
    give_up: bool = False               # stop: the budget cannot be met and the caller asked to give up
    reason: str = ""


@dataclass
class Policy:
    """When to stop pre-dumping and take the final dump, and how hard to throttle."""
    max_passes: int = DEFAULT_MAX_PASSES    # every pass, the final dump included
    min_delta: int = DEFAULT_MIN_DELTA      # no limit: a pass that copied at most this many bytes is enough
    threshold: float = None                 # ... or at most this % of the first (full) pass
    downtime_limit: float = None            # seconds; None: the older rules above
    bandwidth_limit: float = None           # bytes/s the copy is paced to (and the measure capped at)
    give_up: bool = False                   # the pass limit reached over budget: fail, the source goes on
    history: list = field(default_factory=list)
    throttle: int = 0                       # the % the last decision asked for (in force from then on)
    base_cores: float = None                # CPUs the tree used unthrottled, when the throttle began
    aim: float = None                       # bytes/s the measured throttle aims the dirty rate at
    measured: bool = False                  # the last pass's rates were measurable: throttle_after() aims

    # ---------------------------------------------------------------- measures

    def bandwidth(self):
        """bytes/s, bytes-weighted over the last RATE_WINDOW passes that moved something."""
        passes = [f for f in self.history if f.bandwidth is not None][-RATE_WINDOW:]
        if not passes:
            return None
        rate = sum(f.bytes for f in passes) / sum(f.copy_seconds for f in passes)
        return min(rate, self.bandwidth_limit) if self.bandwidth_limit else rate

    def fixed_cost(self):
        """Seconds of a final pass besides its copy: the largest of the last two later pre-dumps'."""
        later = [f for f in self.history[1:] if not f.final] or self.history[:1]
        return max((f.fixed_seconds for f in later[-2:]), default=0.0)

    def remaining(self, now):
        """Bytes a final pass taken at `now` would copy."""
        if len(self.history) < 2:
            return self.history[0].bytes if self.history else None
        last = self.history[-1]
        rate = last.dirty_rate or 0.0
        return min(rate * max(now - last.frozen_at, 0.0), self.history[0].bytes)

    def expected_downtime(self, now):
        bw, left = self.bandwidth(), self.remaining(now)
        if left is None:
            return None
        if not bw:
            return self.fixed_cost() if left == 0 else None
        return self.fixed_cost() + left / bw

    # ---------------------------------------------------------------- decisions

    def record(self, figures):
        self.history.append(figures)

    def decide(self, now):
        """The next pass: final or not, and the throttle for it."""
        done = len(self.history)
        throttle = self.throttle = self.throttle_next(now)
        expected = self.expected_downtime(now)
        if done + 1 >= self.max_passes:
            over = self.downtime_limit is not None and (expected is None or expected > self.downtime_limit)
            if over and self.give_up:
                return Decision(False, 0, expected, give_up=True, reason="pass limit with the budget not met")
            return Decision(True, throttle, expected, missed=over, reason="pass limit")
        if done < 2:
            return Decision(False, throttle, expected, reason="the full copy, then one pass of what changed")
        if self.downtime_limit is not None:
            if expected is not None and expected <= self.downtime_limit:
                return Decision(True, throttle, expected, reason="expected downtime within the limit")
            return Decision(False, throttle, expected, reason="expected downtime over the limit")
        last = self.history[-1].bytes
        if self.threshold is not None:
            if last <= self.history[0].bytes * self.threshold / 100:
                return Decision(True, 0, expected, reason=f"delta at most {self.threshold:g} % of the first pass")
        elif last <= self.min_delta:
            return Decision(True, 0, expected, reason="delta at most --min-delta")
        if last >= self.history[-2].bytes:
            return Decision(True, 0, expected, reason="the delta stopped shrinking")
        return Decision(False, 0, expected, reason="the delta still shrinks")

    def too_fast(self, figures):
        """The tree dirtied memory in this pass's interval faster than the link can usefully carry."""
        bw, dirty = self.bandwidth(), figures.dirty_rate
        return bw is not None and dirty is not None and dirty > TRIGGER * bw

    def throttle_next(self, now):
        """% of the tree's CPU to take away from now on (0: none), at a decision.

        A measured throttle is set by throttle_after() as soon as a pass is taken and kept here;
        only when a rate was not measurable do QEMU's steps apply at the decision."""
        if self.downtime_limit is None or len(self.history) < 2:
            return 0
        current = self.throttle
        expected = self.expected_downtime(now)
        if self.measured or (expected is not None and expected <= self.downtime_limit):
            return current
        return self.stepped()

    def throttle_after(self, taken):
        """% to throttle at from now on, right after pass `taken` froze the tree and counted its bytes
        (before it is sent, and before record()): None when a rate is not measurable (then the steps
        of throttle_next apply at the next decision).

        Set now, the throttle holds over the whole interval the next pass counts: its effect is
        measured one pass later, not two."""
        bw, current = self.bandwidth(), self.throttle
        per_cpu = taken.dirty_per_cpu
        base = self.base_cores or taken.cores
        self.measured = False
        if self.downtime_limit is None or not self.history or taken.final:
            return None
        if not bw or per_cpu is None or not base:
            return None
        self.measured = True
        fixed, dirty = self.fixed_cost(), taken.dirty_rate
        send = fixed + taken.bytes / bw                     # the next decision comes after this
        if fixed + dirty * send / bw <= self.downtime_limit:
            return current                                  # the budget will be met: keep what works
        if not current and dirty <= TRIGGER * bw:
            return 0
        aim = self.aim_rate(send, bw, fixed)
        share = min(aim / per_cpu / base, 1.0)              # of the unthrottled CPU use
        percent = math.ceil(100 * (1 - share))
        if taken.bytes >= SATURATED * self.history[-1].bytes:
            # it did not shrink: the tree rewrote what it writes, and counted once, its pages per CPU
            # second are a lower bound: halve the share
            percent = max(percent, math.ceil(100 - (100 - percent) / 2))
        if taken.throttle and self.aim and dirty > self.aim:
            percent = max(percent, math.ceil(100 - (100 - taken.throttle) / 2))    # missed its aim: tighten
        percent = max(min(max(percent, current), MAX_PERCENT), 1)     # over budget: never relax
        self.base_cores, self.aim = base, aim
        return percent

    def aim_rate(self, send, bw, fixed):
        """bytes/s the throttled tree should dirty at: AIM_FRACTION of the bandwidth, or what the budget needs.

        While the pass just taken is sent (`send` s), the tree dirties aim x send; the next pass
        carries that in fixed + aim x send / bw, while the tree dirties aim x that, which a final pass
        then carries: it fits the budget L when aim x (fixed + aim x send / bw) <= (L - fixed) x bw,
        whose positive root is the aim."""
        aim = AIM_FRACTION * bw
        room = (self.downtime_limit - fixed) * bw           # bytes a final pass may carry
        if room <= 0 or send <= 0:
            return aim
        a = send / bw
        return min(aim, (-fixed + math.sqrt(fixed * fixed + 4 * a * room)) / (2 * a))

    def stepped(self):
        """QEMU's auto-converge steps: the fallback when a rate is not measurable."""
        current = self.throttle
        if current:
            return min(current + STEP_PERCENT, MAX_PERCENT)
        recent = [f for f in self.history[1:]][-2:]
        if len(recent) == 2 and all(self.too_fast(f) for f in recent):
            return FIRST_PERCENT
        return 0
