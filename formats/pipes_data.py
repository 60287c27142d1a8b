"""pipes-data.img: bytes that sat in pipe buffers at dump time, and each pipe's size."""

from construct import Struct

from .common import U32, U64, Array32, Blob

MAGIC = b"PYCD"
FILE_NAME = "pipes-data.img"

PipeData = Struct(
    "pipe_id" / U64,            # the pipe's inode, as in files.img
    "data" / Blob,
    "size" / U32,               # the pipe's capacity in bytes (F_GETPIPE_SZ)
)

Body = Struct(
    "pipes" / Array32(PipeData),
)
