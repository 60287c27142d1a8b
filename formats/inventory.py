"""inventory.img: what a dump directory is and where it sits in a chain."""

from construct import Enum, Int8ul, Struct

from .common import U32, U64, Array32, String

MAGIC = b"PYCI"
FILE_NAME = "inventory.img"

#: Where each XSAVE state component lies in the standard format on the dumping
#: CPU (CPUID leaf 0xD subleaf i): a restore moves each to where its CPU has it.
XstateComponent = Struct(
    "index" / U32,
    "offset" / U32,
    "size" / U32,
)

Cpu = Struct(
    "vendor" / String,          # /proc/cpuinfo vendor_id, for the reader
    "model" / String,           # /proc/cpuinfo model name, for the reader
    "xcr0" / U64,               # state components the kernel enabled for user space
    "xstate_size" / U32,        # bytes of the NT_X86_XSTATE regset
    "xstate_components" / Array32(XstateComponent),
)

DumpKind = Enum(Int8ul, **{"dump": 0, "pre-dump": 1, "lazy-dump": 2})   # lazy-dump: dump --lazy-pages

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
    "cpu" / Cpu,                # what the threads' xstate was read with
)
