"""Emit the cffi (API mode) C glue for pycr.native._core.

Run by meson at build time: `python ffi_build.py OUTPUT.c`. Only the C text is
generated here; meson compiles it with core.c into the extension module.
"""

import pathlib
import re
import sys

import cffi

HERE = pathlib.Path(__file__).resolve().parent


def cdef_text():
    """The declarations between the CDEF markers of core.h."""
    text = (HERE / "core.h").read_text()
    match = re.search(r"/\* CDEF-BEGIN \*/(.*)/\* CDEF-END \*/", text, re.S)
    if not match:
        raise SystemExit("core.h: CDEF markers not found")
    return match.group(1)


def make_builder():
    ffibuilder = cffi.FFI()
    ffibuilder.cdef(cdef_text())
    ffibuilder.set_source("pycr.native._core", '#include "core.h"\n')
    return ffibuilder


if __name__ == "__main__":
    out = pathlib.Path(sys.argv[1])
    make_builder().emit_c_code(str(out))
