"""Incremental restore and `pycr migrate`.

A replica of a tree is built from the first pass of a pre-dump chain and kept
stopped; each later pass is applied to it (tasks killed, forked, re-parented,
address spaces reshaped, changed pages written) until the final dump, after
which the replica is finished and resumed. Modules:

  transport  where image sets come from (a directory today; a socket later)
  treediff   which tasks vanished, appeared or changed parent between passes
  mmdiff     how one address space must change (unmap, map, re-protect)
  layout     applying that plan inside a stopped replica task
  pages      writing a pass's pages and shared objects into the replica
  replica    the replica itself: create, update pass by pass, finish, resume
  follow     the destination loop: ask the transport, apply, resume on the dump
  loop       the source loop: pre-dump passes, the final frozen dump
  policy     when to switch over (downtime budget, bandwidth, dirty rate) and how hard to throttle
  converge   the source's per-pass measures, --bandwidth-limit pacing, driving policy and throttle
  throttle   auto-converge: the source tree's CPU quota in a cgroup, and undoing it
  report     the per-pass report and its text
"""

from .follow import follow
from .loop import migrate
from .transport import DirectoryTransport, Transport

__all__ = ["DirectoryTransport", "Transport", "follow", "migrate"]
