"""tracker-<pid>.img: what a dirty-page tracker keeps for its next pass.

One per process of a pre-dump pass. The next pass (pre-dump or dump with
--prev-images-dir) reads it to find what changed since this one:
- uffd-wp: the number of the userfaultfd left open in the target (-1: none)
  and the address ranges registered with it;
- hash: a 64-bit hash of every page saved in the chain (runs, then hashes in
  run order).
start_time (field 22 of stat) tells a reused PID from the same process.
Run lists and hashes are raw little-endian u64 arrays in blobs: a 1 GiB
process has 262144 hashes, too many for one construct object each.
"""

from construct import Int32sl, Struct

from .common import U64, Blob, String

MAGIC = b"PYCK"
FILE_NAME = "tracker-{pid}.img"

Body = Struct(
    "pid" / U64,
    "tracker" / String,        # "uffd-wp", "soft-dirty" or "hash"
    "start_time" / U64,        # of the process, in clock ticks since boot
    "uffd_fd" / Int32sl,       # userfaultfd number in the target, -1 if none
    "registered" / Blob,       # u64 pairs (start, length): ranges registered with it
    "hash_runs" / Blob,        # u64 pairs (start, length) of the hashed pages
    "hashes" / Blob,           # one u64 per page of hash_runs, in order
)
