"""Run the `pycr` command as another user: `pycr_as(uid, gid, *args, caps=())`.

The interpreter may live where that user cannot read (a root-owned pyenv), so
it is started as root, imports pycr whole, and only then drops to uid/gid with
no groups and no capability but `caps` (made ambient, as a file capability or
a service manager would give them): the same process a user would run.

Run as a script: python asuser.py UID GID CAPS ARGS... (CAPS: "40,21" or "-").
"""

import ctypes
import os
import struct
import subprocess
import sys

PR_SET_KEEPCAPS, PR_SET_DUMPABLE, PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE = 8, 4, 47, 2
SYS_CAPSET = 126
CAP_CHECKPOINT_RESTORE = 40


def pycr_as(uid, gid, *args, caps=(), timeout=120, expect=0):
    """Run `pycr ARGS` as uid/gid with only `caps`; assert its exit status (None: any)."""
    cmd = [sys.executable, os.path.abspath(__file__), str(uid), str(gid),
           ",".join(map(str, caps)) or "-", *map(str, args)]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, close_fds=True, cwd="/")
    if expect is not None and proc.returncode != expect:
        raise AssertionError(f"pycr {' '.join(map(str, args))} as uid {uid} exited {proc.returncode}, "
                             f"expected {expect}\n--- stderr:\n{proc.stderr[-3000:]}")
    return proc


def _drop(uid, gid, caps):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    mask = sum(1 << c for c in caps)
    header = ctypes.create_string_buffer(struct.pack("<Ii", 0x20080522, 0))
    lo, hi = mask & 0xFFFFFFFF, mask >> 32
    data = ctypes.create_string_buffer(struct.pack("<6I", lo, lo, lo, hi, hi, hi))
    if libc.syscall(SYS_CAPSET, header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")
    for cap in caps:
        if libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"ambient cap {cap}")
    libc.prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0)
    libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)   # a credential change cleared it


def _imported_inside_functions(top):
    """Every module pycr's sources import by an absolute name (those imported where they are
    used, e.g. concurrent.futures, would otherwise be loaded after the drop, from where the
    user may not read)."""
    import ast
    names = set()
    for directory, _dirs, files in os.walk(top):
        for file in files:
            if file.endswith(".py"):
                with open(os.path.join(directory, file)) as f:
                    tree = ast.parse(f.read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        names.update(alias.name for alias in node.names)
                    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                        names.add(node.module)
    return sorted(n for n in names if not n.startswith("pycr"))


def main():
    import importlib
    import pkgutil
    import runpy
    import pycr
    for mod in pkgutil.walk_packages(pycr.__path__, "pycr."):
        if not mod.name.endswith("__main__"):
            importlib.import_module(mod.name)
    for name in _imported_inside_functions(os.path.dirname(pycr.__file__)):
        try:
            importlib.import_module(name)
        except ImportError:          # an optional module (matplotlib...) this machine lacks
            pass
    import concurrent.futures.thread  # noqa: F401  (ThreadPoolExecutor is loaded on first use)
    uid, gid, caps = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    _drop(uid, gid, [] if caps == "-" else [int(c) for c in caps.split(",")])
    sys.argv = ["pycr", *sys.argv[4:]]
    runpy.run_module("pycr", run_name="__main__")


if __name__ == "__main__":
    main()
