"""Reading /proc files with kernel errors mapped onto pycr.errors.

Every parser goes through these so that a vanished task is always TaskGone
and a refused read is always AccessDenied, whatever file was touched.
"""

import os

from pycr.errors import from_oserror


def path(pid, name, tid=None):
    """The /proc path of `name` for a process, or for one of its threads."""
    if tid is None:
        return f"/proc/{pid}/{name}"
    return f"/proc/{pid}/task/{tid}/{name}"


def read_bytes(pid, name, tid=None):
    try:
        with open(path(pid, name, tid), "rb") as f:
            return f.read()
    except OSError as exc:
        raise from_oserror(exc, pid, name) from None


def read_text(pid, name, tid=None):
    return read_bytes(pid, name, tid).decode("utf-8", "surrogateescape")


def readlink(pid, name, tid=None):
    try:
        return os.readlink(path(pid, name, tid))
    except OSError as exc:
        raise from_oserror(exc, pid, name) from None


def listdir(pid, name, tid=None):
    try:
        return os.listdir(path(pid, name, tid))
    except OSError as exc:
        raise from_oserror(exc, pid, name) from None
