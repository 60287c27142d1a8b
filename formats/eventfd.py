"""eventfd.img: the counter and mode of every eventfd of the tree."""

from construct import Flag, Struct

from .common import U32, U64, Array32

MAGIC = b"PYCE"
FILE_NAME = "eventfd.img"

Eventfd = Struct(
    "file_id" / U32,            # the open file description, as in files.img
    "count" / U64,              # the counter (eventfd-count in fdinfo)
    "semaphore" / Flag,         # EFD_SEMAPHORE: a read takes 1, not the whole count
)

Body = Struct(
    "eventfds" / Array32(Eventfd),
)
