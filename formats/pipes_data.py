"""pipes-data.img: bytes that sat in pipe buffers at dump time."""

from construct import Struct

from .common import U64, Array32, Blob

MAGIC = b"PYCD"
FILE_NAME = "pipes-data.img"

PipeData = Struct(
    "pipe_id" / U64,            # the pipe's inode, as in files.img
    "data" / Blob,
)

Body = Struct(
    "pipes" / Array32(PipeData),
)
