"""The image formats of pycr: one construct schema per image kind.

The registry below maps a kind name to its magic, body schema and file-name
pattern. A file is the 8-byte header (common.Header) followed by the body.
pages-<owner>.img is raw page data without a header; it is listed here so
that a directory listing can name it, but has no magic and no schema.
"""

import importlib
from collections import namedtuple
from collections.abc import Mapping

from . import common
from .common import FORMAT_VERSION, HEADER_SIZE, Header

ImageKind = namedtuple("ImageKind", "name magic schema pattern")
ImageKind.__doc__ = "One image kind: magic (None for raw), body schema, file-name pattern."

#: Every image kind, by name, and the module of formats/ that declares it. A module is imported (its
#: schema built) the first time its kind is asked for: a command pays only for the formats it touches.
MODULES = {
    "inventory": "inventory",
    "pstree": "pstree",
    "core": "core",
    "mm": "mm",
    "pagemap": "pagemap",
    "files": "files",
    "pipes-data": "pipes_data",
    "tracker": "tracker",
    "eventfd": "eventfd",
    "eventpoll": "eventpoll",
    "signalfd": "signalfd",
    "timerfd": "timerfd",
    "inotify": "inotify",
    "memfd": "memfd",
    "ghost": "ghost",
    "sysvshm": "sysvshm",
    "unixsk": "unixsk",
    "inetsk": "inetsk",
    "timers": "timers",
    "file-locks": "file_locks",
    "tty": "tty",
    "manifest": "manifest",
}


class _Kinds(Mapping):
    """{kind name: ImageKind}, each built from its module on first use."""

    def __init__(self):
        self._built = {"pages": ImageKind("pages", None, None, "pages-{owner}.img")}

    def __getitem__(self, name):
        kind = self._built.get(name)
        if kind is None:
            mod = importlib.import_module(f"{__name__}.{MODULES[name]}")      # KeyError: no such kind
            kind = self._built[name] = ImageKind(name, mod.MAGIC, mod.Body, mod.FILE_NAME)
        return kind

    def __iter__(self):
        yield from MODULES
        yield "pages"

    def __len__(self):
        return len(MODULES) + 1

    def __contains__(self, name):
        return name in MODULES or name == "pages"


KINDS = _Kinds()

_by_magic = {}


def kind_of_magic(magic):
    """The kind name whose magic is `magic` (4 bytes), or None (every format is loaded to know)."""
    if not _by_magic:
        _by_magic.update({k.magic: k.name for k in KINDS.values() if k.magic})
    return _by_magic.get(bytes(magic[:4]))


def kind_of_file(path):
    """The kind of the image file at `path` by its magic, or None (raw pages, foreign)."""
    with open(path, "rb") as f:
        return kind_of_magic(f.read(4))


def file_name(kind, key=None):
    """The file name of an image of `kind`; key is the pid or owner if per-task."""
    pattern = KINDS[kind].pattern
    if "{" not in pattern:
        return pattern
    if key is None:
        raise ValueError(f"a {kind} image needs a pid or owner for its file name")
    return pattern.format(pid=key, owner=key)


def __getattr__(name):
    """`formats.core` and the like: the module of a kind, imported when first named."""
    if name in MODULES.values():
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "KINDS", "ImageKind", "kind_of_magic", "kind_of_file", "file_name", "FORMAT_VERSION",
    "HEADER_SIZE", "Header", "common", "core", "files", "inventory", "manifest", "mm",
    "pagemap", "pipes_data", "eventfd", "eventpoll", "signalfd", "timerfd", "inotify", "memfd", "ghost", "sysvshm", "pstree", "tracker", "unixsk", "inetsk", "timers", "file_locks", "tty",
]
