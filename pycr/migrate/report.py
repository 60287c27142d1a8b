"""The per-pass report of an incremental restore, and the summary of a migration.

Figures come from the image set on disk (what was actually moved), so the
same report serves `pycr restore --follow` and `pycr migrate`.
"""

import os
from dataclasses import dataclass

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

    @property
    def seconds(self):
        return self.source_seconds + self.apply_seconds

    def line(self):
        extra = f", {self.recreated} re-created" if self.recreated else ""
        return (f"pass {self.number} {self.kind}: +{self.added} -{self.removed} tasks{extra}, "
                f"{self.pages} pages, {self.bytes} bytes, {self.seconds:.3f} s "
                f"(source {self.source_seconds:.3f} s, replica {self.apply_seconds:.3f} s)")


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

    def lines(self):
        where = f", namespace init {self.init_real}" if self.init_real else ""
        return [f"replica: root pid {self.root_pid} (pid {self.root_real} outside its namespace{where})",
                f"downtime {self.downtime:.3f} s (source frozen -> replica running), "
                f"{self.total_bytes} bytes moved in {self.passes} passes"]
