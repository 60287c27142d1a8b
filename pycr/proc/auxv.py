"""/proc/PID/auxv: the ELF auxiliary vector, raw and as (type, value) pairs.

The raw bytes are what PR_SET_MM_MAP wants back at restore.
"""

import struct

from pycr.proc._read import read_bytes

AT_NULL = 0


def auxv_bytes(pid):
    return read_bytes(pid, "auxv")


def pairs(raw):
    """(type, value) pairs up to and excluding AT_NULL."""
    out = []
    for key, value in struct.iter_unpack("<QQ", raw[: len(raw) // 16 * 16]):
        if key == AT_NULL:
            break
        out.append((key, value))
    return out


def auxv(pid):
    return pairs(auxv_bytes(pid))
