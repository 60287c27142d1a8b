"""The per-pass report of an incremental restore, and the summary of a migration.

Figures come from the image set on disk (what was actually moved), so the
same report serves `pycr restore --follow` and `pycr migrate`.
"""

import os
from dataclasses import dataclass

from pycr.cliopts import plural
from pycr.sysinfo import page_size

PAGE = page_size()


def image_set_size(path):
    """(pages, bytes) of one image set: pages in its own pages files, bytes of all its files (holes left out)."""
    pages = total = 0
    with os.scandir(path) as entries:
        for entry in entries:
            if not entry.is_file() or entry.name.startswith("."):
                continue
            st = entry.stat()
            size = min(st.st_size, st.st_blocks * 512)    # a lazy set's holes are not sent
            total += size
            if entry.name.startswith("pages-"):
                pages += size // PAGE
    return pages, total


@dataclass
class PassReport:
    number: int
    kind: str               # pre-dump | dump
    path: str
    added: int
    removed: int
    recreated: int
    pages: int              # pages the image set carries
    bytes: int              # bytes of all its files
    source_seconds: float   # taking the image set (0 when another process did)
    apply_seconds: float    # loading it and applying it to the replica
    # filled in by a source that measures its passes (pycr.migrate.converge):
    bandwidth: float = None         # bytes/s of the pass's copy
    dirty_rate: float = None        # bytes/s the tree dirtied since the previous pass
    expected_downtime: float = None  # s, of a final pass taken after this one
    throttle: int = None            # % of the tree's CPU taken away while these bytes were dirtied

    @property
    def seconds(self):
        return self.source_seconds + self.apply_seconds

    def line(self):
        extra = f", {self.recreated} re-created" if self.recreated else ""
        return (f"pass {self.number} {self.kind}: +{self.added} -{self.removed} tasks{extra}, "
                f"{self.pages} pages, {self.bytes} bytes, {self.seconds:.3f} s "
                f"(source {self.source_seconds:.3f} s, replica {self.apply_seconds:.3f} s)" + self.rates())

    def rates(self):
        """", bandwidth B MiB/s, dirty D MiB/s, expected downtime E ms, throttle T %" (what is known)."""
        if self.throttle is None:
            return ""
        mib = 1 << 20
        bw = "-" if self.bandwidth is None else f"{self.bandwidth / mib:.1f} MiB/s"
        dirty = "-" if self.dirty_rate is None else f"{self.dirty_rate / mib:.1f} MiB/s"
        out = f", bandwidth {bw}, dirty {dirty}"
        if self.expected_downtime is not None:
            out += f", expected downtime {self.expected_downtime * 1000:.0f} ms"
        return out + f", throttle {self.throttle} %"


def for_pass(changes, path, source_seconds, apply_seconds):
    pages, size = image_set_size(path)
    return PassReport(number=changes.number, kind=changes.kind, path=path, added=len(changes.added),
                      removed=len(changes.removed), recreated=len(changes.recreated), pages=pages,
                      bytes=size, source_seconds=source_seconds, apply_seconds=apply_seconds)


@dataclass
class Summary:
    passes: int
    downtime: float         # source frozen -> replica running
    total_bytes: int
    root_pid: int           # in the replica's namespace
    root_real: int          # as seen from outside it
    init_real: int          # the namespace's init, as seen from outside (0 without one)
    downtime_limit: float = None    # s, the budget asked for
    expected: float = None          # s, the policy's estimate when it chose the final pass
    throttle_max: int = 0           # highest throttle, %
    throttle_kind: str = ""         # its mechanism

    @property
    def budget_met(self):
        return None if self.downtime_limit is None else self.downtime <= self.downtime_limit

    def lines(self):
        where = f", namespace init {self.init_real}" if self.init_real else ""
        out = [f"replica: root pid {self.root_pid} (pid {self.root_real} outside its namespace{where})",
               f"downtime {self.downtime:.3f} s (source frozen -> replica running), "
               f"{self.total_bytes} bytes moved in {plural(self.passes, 'pass')}"]
        out += budget_lines(self.downtime, self.downtime_limit, self.expected, self.throttle_max,
                            self.throttle_kind)
        return out


def budget_lines(downtime, limit, expected, throttle_max, throttle_kind):
    """The summary's lines on the downtime budget and auto-converge (local or between hosts)."""
    out = []
    if limit is not None:
        guess = "" if expected is None else f" (expected {expected * 1000:.0f} ms)"
        if downtime <= limit:
            out.append(f"downtime budget {limit * 1000:.0f} ms met{guess}")
        else:
            out.append(f"downtime budget {limit * 1000:.0f} ms missed by {(downtime - limit) * 1000:.0f} ms{guess}")
    if throttle_max:
        out.append(f"auto-converge: the source was throttled up to {throttle_max} % ({throttle_kind})")
    return out
