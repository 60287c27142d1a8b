"""pstree.img: the processes of the tree, their ids and their threads; its zombies."""

from construct import Default, Flag, Struct

from .common import U32, U64, Array32, String

MAGIC = b"PYCT"
FILE_NAME = "pstree.img"

Process = Struct(
    "pid" / U32,
    "ppid" / U32,
    "pgid" / U32,
    "sid" / U32,
    "start_time" / U64,         # field 22 of /proc/PID/stat
    "threads" / Array32(U32),   # live tids, the thread-group leader first (absent if it exited)
    "leader_exited" / Default(Flag, False),     # the leader is a zombie, its threads run
    "leader_exit_code" / Default(U32, 0),       # its wait status (stat field 52)
    "shares_files" / Default(Flag, False),      # one fd table with its parent (CLONE_FILES)
)

Zombie = Struct(
    "pid" / U32,
    "ppid" / U32,               # a process of the tree, which has not reaped it yet
    "pgid" / U32,
    "sid" / U32,
    "start_time" / U64,
    "exit_code" / U32,          # wait status as waitpid returns it (stat field 52)
    "comm" / String,
)

Body = Struct(
    "processes" / Array32(Process),   # parents before their children
    "zombies" / Default(Array32(Zombie), []),   # dead children their parents have not reaped
)
