"""files.img: the open file descriptors of every process of the tree."""

from construct import Enum, Flag, Int8ul, Struct

from .common import U32, U64, Array32, String

MAGIC = b"PYCF"
FILE_NAME = "files.img"

FdType = Enum(
    Int8ul, reg=0, dir=1, pipe=2, fifo=3, chr=4, tty=5, unsupported=6,
    # kernel objects with an image of their own (pycr/collect/kinds.py), keyed by file_id there
    unixsk=7, inetsk=8, eventpoll=9, eventfd=10, signalfd=11, timerfd=12, inotify=13,
    ptmx=14, pts=15, memfd=16,
)

Fd = Struct(
    "fd" / U32,
    "type" / FdType,
    "flags" / U32,              # open flags from fdinfo (octal there)
    "pos" / U64,
    "cloexec" / Flag,
    "path" / String,            # readlink of /proc/PID/fd/N, without " (deleted)"
    "deleted" / Flag,
    "pipe_id" / U64,            # inode of the pipe for pipe/fifo, else 0
    "rdev" / U64,               # device number for chr/tty, else 0
    "size" / U64,               # size of a regular file at dump time
    "file_id" / U32,            # open file description: fds with the same id share one (offset, flags)
)

ProcessFds = Struct(
    "pid" / U32,
    "fds" / Array32(Fd),        # ascending fd numbers
)

Body = Struct(
    "processes" / Array32(ProcessFds),
)
