"""manifest.img: the identity of an image set and a checksum of every file in it.

Written last, after every other file of the set is durable: a directory
without a valid manifest is an unfinished dump and is never restored.
Headered images carry a BLAKE2b-128 digest of their whole bytes; raw pages
files carry one CRC-32C per `chunk_size` bytes instead, which the dump
computes while copying and the restore checks before creating any task.
`digest` closes the file: BLAKE2b-128 of every byte before it.
"""

from construct import Struct

from .common import U32, U64, Array32, Blob, FixedBlob, String

MAGIC = b"PYCS"
FILE_NAME = "manifest.img"

ID_SIZE = 16
DIGEST_SIZE = 16

Entry = Struct(
    "name" / String,            # file name in the directory, e.g. "core-1234.img"
    "size" / U64,               # bytes
    "digest" / Blob,            # BLAKE2b-128 of the file; empty for pages files
    "sums" / Blob,              # pages files: u32 CRC-32C per chunk_size bytes; else empty
)

Body = Struct(
    "set_id" / FixedBlob(ID_SIZE),          # random, one per directory (pass)
    "parent_set_id" / FixedBlob(ID_SIZE),   # set_id of inventory.parent's set; zeros if none
    "chunk_size" / U32,                     # bytes per pages checksum
    "files" / Array32(Entry),               # every file of the set but this one, by name
    "digest" / FixedBlob(DIGEST_SIZE),      # BLAKE2b-128 of the file up to this field
)
