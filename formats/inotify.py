"""inotify.img: the watches of every inotify instance of the tree."""

from construct import Struct

from .common import U32, U64, Array32, String

MAGIC = b"PYCO"
FILE_NAME = "inotify.img"

Watch = Struct(
    "wd" / U32,                 # the watch descriptor the program got
    "mask" / U32,               # events and flags (IN_ONESHOT, IN_EXCL_UNLINK, ...)
    "dev" / U64,                # st_dev of the watched inode
    "ino" / U64,                # st_ino of the watched inode
    "path" / String,            # where the dump found that inode
)

Inotify = Struct(
    "file_id" / U32,            # the open file description, as in files.img
    "watches" / Array32(Watch),
)

Body = Struct(
    "inotifies" / Array32(Inotify),
)
