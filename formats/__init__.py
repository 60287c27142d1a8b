"""The image formats of pycr: one construct schema per image kind.

The registry below maps a kind name to its magic, body schema and file-name
pattern. A file is the 8-byte header (common.Header) followed by the body.
pages-<owner>.img is raw page data without a header; it is listed here so
that a directory listing can name it, but has no magic and no schema.
"""

from collections import namedtuple

from . import (common, core, eventfd, eventpoll, file_locks, files, ghost, inetsk, inotify, inventory,
               manifest, memfd, mm, pagemap, pipes_data, pstree, signalfd, sysvshm, timerfd, timers, tracker,
               tty, unixsk)
from .common import FORMAT_VERSION, HEADER_SIZE, Header

ImageKind = namedtuple("ImageKind", "name magic schema pattern")
ImageKind.__doc__ = "One image kind: magic (None for raw), body schema, file-name pattern."

KINDS = {
    mod_name: ImageKind(mod_name, mod.MAGIC, mod.Body, mod.FILE_NAME)
    for mod_name, mod in (
        ("inventory", inventory),
        ("pstree", pstree),
        ("core", core),
        ("mm", mm),
        ("pagemap", pagemap),
        ("files", files),
        ("pipes-data", pipes_data),
        ("tracker", tracker),
        ("eventfd", eventfd),
        ("eventpoll", eventpoll),
        ("signalfd", signalfd),
        ("timerfd", timerfd),
        ("inotify", inotify),
        ("memfd", memfd),
        ("ghost", ghost),
        ("sysvshm", sysvshm),
        ("unixsk", unixsk),
        ("inetsk", inetsk),
        ("timers", timers),
        ("file-locks", file_locks),
        ("tty", tty),
        ("manifest", manifest),
    )
}
KINDS["pages"] = ImageKind("pages", None, None, "pages-{owner}.img")

_BY_MAGIC = {k.magic: k.name for k in KINDS.values() if k.magic}


def kind_of_magic(magic):
    """The kind name whose magic is `magic` (4 bytes), or None."""
    return _BY_MAGIC.get(bytes(magic[:4]))


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


__all__ = [
    "KINDS", "ImageKind", "kind_of_magic", "kind_of_file", "file_name", "FORMAT_VERSION",
    "HEADER_SIZE", "Header", "common", "core", "files", "inventory", "manifest", "mm",
    "pagemap", "pipes_data", "eventfd", "eventpoll", "signalfd", "timerfd", "inotify", "memfd", "ghost", "sysvshm", "pstree", "tracker", "unixsk", "inetsk", "timers", "file_locks", "tty",
]
