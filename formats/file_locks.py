"""file-locks.img: flock, POSIX record and OFD locks the tree held (--file-locks)."""

from construct import Enum, Flag, Int8ul, Struct

from .common import U32, U64, Array32

MAGIC = b"PYCB"
FILE_NAME = "file-locks.img"

LockKind = Enum(Int8ul, posix=0, flock=1, ofd=2)

FileLock = Struct(
    "kind" / LockKind,
    "write" / Flag,             # exclusive (F_WRLCK, LOCK_EX); else shared (F_RDLCK, LOCK_SH)
    "pid" / U32,                # the process that takes it again (the owner for posix)
    "fd" / U32,                 # one of its fds on the open file description
    "file_id" / U32,            # that description, as in files.img
    "start" / U64,              # first byte (0 for flock)
    "length" / U64,             # bytes; 0 = to the end of the file (always 0 for flock)
)

Body = Struct(
    "locks" / Array32(FileLock),
)
