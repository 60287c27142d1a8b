"""pstree.img: the processes of the tree, their ids and their threads."""

from construct import Struct

from .common import U32, U64, Array32

MAGIC = b"PYCT"
FILE_NAME = "pstree.img"

Process = Struct(
    "pid" / U32,
    "ppid" / U32,
    "pgid" / U32,
    "sid" / U32,
    "start_time" / U64,         # field 22 of /proc/PID/stat
    "threads" / Array32(U32),   # tids, the thread-group leader first
)

Body = Struct(
    "processes" / Array32(Process),   # parents before their children
)
