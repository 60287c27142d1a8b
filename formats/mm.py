"""mm-<pid>.img: the layout of one address space (not its contents)."""

from construct import Enum, Flag, Int8ul, Struct

from .common import U32, U64, Array32, Blob, String

MAGIC = b"PYCM"
FILE_NAME = "mm-{pid}.img"

#: prot bits, the same values as PROT_READ / PROT_WRITE / PROT_EXEC.
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4

VmaKind = Enum(
    Int8ul,
    anon=0, file=1, heap=2, stack=3, vdso=4, vvar=5, vvar_vclock=6,
    vsyscall=7, shmem=8,
)

MM_FIELDS = (
    "start_code", "end_code", "start_data", "end_data", "start_brk", "brk",
    "start_stack", "arg_start", "arg_end", "env_start", "env_end",
)

MmFields = Struct(*[name / U64 for name in MM_FIELDS])

Vma = Struct(
    "start" / U64,
    "end" / U64,                # exclusive
    "prot" / Int8ul,            # PROT_READ | PROT_WRITE | PROT_EXEC
    "shared" / Flag,            # MAP_SHARED ('s' in maps)
    "pgoff" / U64,              # offset into the file in bytes, as in maps
    "dev_major" / U32,
    "dev_minor" / U32,
    "inode" / U64,
    "path" / String,            # as in maps; "" for anonymous
    "kind" / VmaKind,
    "vmflags" / String,         # smaps VmFlags, e.g. "rd wr mr mw me ac"
    "shmem_id" / U64,           # kind shmem: pages live in pages-shmem-<id>.img
    "pkey" / U32,               # memory protection key (smaps ProtectionKey), 0 = default
    "file_size" / U64,          # kind file: the file's size at dump time (0 otherwise)
    "file_mtime_ns" / U64,      # kind file: its modification time, ns (a restore refuses a changed file)
)

Body = Struct(
    "pid" / U32,
    "exe" / String,
    "mm" / MmFields,
    "auxv" / Blob,              # /proc/PID/auxv bytes
    "vmas" / Array32(Vma),      # ascending, non-overlapping
)
