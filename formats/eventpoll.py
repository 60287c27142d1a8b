"""eventpoll.img: every epoll set of the tree and what it watches."""

from construct import Flag, Struct

from .common import U32, U64, Array32

MAGIC = b"PYCL"
FILE_NAME = "eventpoll.img"

Target = Struct(
    "pid" / U32,                # the process (dumped PID) whose fd table tfd is a number of
    "tfd" / U32,                # the watched fd, as that process numbers it
    "events" / U32,             # the registration's events, EPOLLET/ONESHOT/EXCLUSIVE/WAKEUP included
    "data" / U64,               # what epoll_wait reports with it
)

Eventpoll = Struct(
    "file_id" / U32,            # the open file description, as in files.img
    "idle" / Flag,              # nothing was ready in it at the dump
    "targets" / Array32(Target),
)

Body = Struct(
    "eventpolls" / Array32(Eventpoll),
)
