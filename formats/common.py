"""Pieces every image kind shares: the header, strings, blobs, registers.

All integers are little-endian. Strings and blobs carry a u32 byte-length
prefix so that a reader in any language can skip them without decoding.
"""

from construct import (
    Adapter,
    Bytes,
    Int32ul,
    Int64ul,
    Prefixed,
    PrefixedArray,
    GreedyBytes,
    Struct,
)

#: Version written by this pycr; readers refuse anything newer.
FORMAT_VERSION = 3

#: Every image file starts with this: 4 magic bytes, then the format version.
Header = Struct(
    "magic" / Bytes(4),
    "version" / Int32ul,
)
HEADER_SIZE = Header.sizeof()

U32 = Int32ul
U64 = Int64ul


def _to_bytes(obj):
    """Bytes from bytes-like or a hex string (what JSON hands back)."""
    if isinstance(obj, str):
        return bytes.fromhex(obj)
    return bytes(obj)


class StringAdapter(Adapter):
    """UTF-8 text where undecodable bytes survive as lone surrogates.

    Paths on Linux are arbitrary bytes; surrogateescape keeps them exact, and
    json escapes the surrogates (\\udcXX) so the round trip stays lossless.
    """

    def _decode(self, obj, context, path):
        return obj.decode("utf-8", "surrogateescape")

    def _encode(self, obj, context, path):
        if isinstance(obj, (bytes, bytearray)):
            return bytes(obj)
        return obj.encode("utf-8", "surrogateescape")


class BlobAdapter(Adapter):
    """Raw bytes; building also accepts a hex string, as found in JSON."""

    def _decode(self, obj, context, path):
        return bytes(obj)

    def _encode(self, obj, context, path):
        return _to_bytes(obj)


#: u32 byte length + UTF-8 (surrogateescape) text.
String = StringAdapter(Prefixed(Int32ul, GreedyBytes))

#: u32 byte length + raw bytes.
Blob = BlobAdapter(Prefixed(Int32ul, GreedyBytes))


def FixedBlob(size):
    """Exactly `size` raw bytes with no length prefix (e.g. a siginfo)."""
    return BlobAdapter(Bytes(size))


def Array32(subcon):
    """u32 element count followed by the elements."""
    return PrefixedArray(Int32ul, subcon)


#: The kernel's x86_64 struct user_regs_struct, field by field, in its order.
REGISTER_NAMES = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
    "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags",
    "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs",
)

Registers = Struct(*[name / Int64ul for name in REGISTER_NAMES])

#: One siginfo_t as the kernel hands it to PTRACE_PEEKSIGINFO.
SIGINFO_SIZE = 128
Siginfo = FixedBlob(SIGINFO_SIZE)

__all__ = [
    "FORMAT_VERSION", "Header", "HEADER_SIZE", "U32", "U64", "String", "Blob",
    "FixedBlob", "Array32", "Registers", "REGISTER_NAMES", "Siginfo",
    "SIGINFO_SIZE",
]
