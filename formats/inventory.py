"""inventory.img: what a dump directory is and where it sits in a chain."""

from construct import Enum, Int8ul, Struct

from .common import U32, U64, String

MAGIC = b"PYCI"
FILE_NAME = "inventory.img"

DumpKind = Enum(Int8ul, **{"dump": 0, "pre-dump": 1})

Body = Struct(
    "pycr_version" / String,
    "kernel" / String,          # uname release of the dumping machine
    "page_size" / U32,
    "root_pid" / U32,
    "root_start_time" / U64,    # field 22 of /proc/PID/stat, in clock ticks
    "kind" / DumpKind,
    "tracker" / String,         # dirty-page tracker name, "" for none
    "parent" / String,          # previous image dir, relative to this one; "" if none
    "pass_nr" / U32,            # 0 for the first pass of a chain
    "created" / U64,            # unix time in nanoseconds
)
