"""sysvshm.img: the SysV shared memory segments the tree has attached."""

from construct import Struct

from .common import U32, U64, Array32

MAGIC = b"PYCV"
FILE_NAME = "sysvshm.img"

Segment = Struct(
    "shmid" / U32,              # its id, = the shmem_id and inode of the VMAs that attach it
    "key" / U32,                # 0: IPC_PRIVATE (also after IPC_RMID)
    "mode" / U32,               # shm_perm.mode: permission bits, SHM_DEST (01000) once IPC_RMID was asked
    "size" / U64,
    "uid" / U32,
    "gid" / U32,
    "cuid" / U32,
    "cgid" / U32,
)

Body = Struct(
    "segments" / Array32(Segment),
)
