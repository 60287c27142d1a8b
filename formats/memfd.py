"""memfd.img: every memfd of the tree, held by fds or mapped, one entry per file."""

from construct import Struct

from .common import U32, U64, Array32, String

MAGIC = b"PYCZ"
FILE_NAME = "memfd.img"

Memfd = Struct(
    "shmem_id" / U64,           # its inode: the shmem_id of the VMAs that map it; pages in pages-shmem-<id>.img
    "name" / String,            # as given to memfd_create (maps show "/memfd:NAME (deleted)")
    "size" / U64,               # st_size
    "seals" / U32,              # F_GET_SEALS
    "mode" / U32,               # permission bits
    "file_ids" / Array32(U32),  # the open file descriptions of files.img (type memfd) that are this file
)

Body = Struct(
    "memfds" / Array32(Memfd),
)
