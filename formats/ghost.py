"""ghost.img: the files the tree holds open or mapped after they were deleted, with where they were."""

from construct import Struct

from .common import U32, U64, Array32, String

MAGIC = b"PYCH"
FILE_NAME = "ghost.img"

Ghost = Struct(
    "ghost_id" / U32,           # contents in pages-ghost-<id>.img (offsets as addresses)
    "dev_major" / U32,          # the file's device and inode at the dump: how mm VMAs name it
    "dev_minor" / U32,
    "inode" / U64,
    "path" / String,            # where it was, without " (deleted)"
    "mode" / U32,               # permission bits (07777)
    "uid" / U32,
    "gid" / U32,
    "size" / U64,
    "mtime_ns" / U64,
    "file_ids" / Array32(U32),  # open file descriptions of files.img (type reg, deleted) of this file
)

Body = Struct(
    "ghosts" / Array32(Ghost),
)
