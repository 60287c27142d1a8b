"""signalfd.img: the signal mask of every signalfd of the tree."""

from construct import Struct

from .common import U32, U64, Array32

MAGIC = b"PYCG"
FILE_NAME = "signalfd.img"

Signalfd = Struct(
    "file_id" / U32,            # the open file description, as in files.img
    "sigmask" / U64,            # bit N-1 = signal N is read through it
)

Body = Struct(
    "signalfds" / Array32(Signalfd),
)
