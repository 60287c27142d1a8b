"""The native core of pycr (cffi, compiled by meson) and the restore stub.

`from pycr.native import core` gives the Python wrappers; see core.py.
"""

from . import core
from .core import stub_path

__all__ = ["core", "stub_path"]
