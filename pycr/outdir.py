"""The directory a dump writes into: never mixed with another set, never left half-written.

A dump into a directory that holds image files refuses (criu would overwrite
them; a set mixed of two dumps could then look whole), unless asked to
replace them. While it writes, the dump holds an exclusive flock on the
directory, so two dumps cannot interleave. If it fails, every file it wrote
is removed again; if it is killed, what it leaves is either an atomic
writer's temporary file (`.NAME.XXXXXXXX.tmp`, removed by the next dump)
or image files without a manifest, which no restore accepts.
"""

import contextlib
import errno
import fcntl
import os
import re

from . import manifest
from .errors import PycrError
from .images import ImageDir, classify_name, fsync_dir
from .log import log

#: Temporary names of images.write_atomic: "." + image name + "." + mkstemp's letters + ".tmp".
TEMP_RE = re.compile(r"\A\.(?P<name>[^/]+\.img)\.[A-Za-z0-9_]+\.tmp\Z")
PROBE_RE = re.compile(r"\A\.pycr-probe-\d+\Z")


def is_temp(name):
    """True for a file a killed dump may leave: an atomic writer's temp file or the write probe."""
    match = TEMP_RE.match(name)
    return bool(match and classify_name(match.group("name"))) or bool(PROBE_RE.match(name))


def image_files(path):
    """Names of the image files (and stale temp files) in path."""
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return [], []
    return sorted(n for n in names if classify_name(n)), sorted(n for n in names if is_temp(n))


@contextlib.contextmanager
def writing(path, overwrite=False, pages_sink=None, durable=True):
    """An ImageDir for a new image set at path; on failure everything it wrote is removed.

    pages_sink: a page server's client the pages files go to (ImageDir.pages_sink).
    durable: False for a set that is read back at once and never outlives its command (ImageDir).

    Refuses a directory holding another set unless overwrite (which removes
    it first, the manifest before anything else so that it is never valid
    half-removed). Stale temp files of a killed dump are removed.
    """
    path = os.fspath(path)
    created = not os.path.isdir(path)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise PycrError(f"cannot write images to {path}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(dfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise PycrError(f"{path}: another pycr dump is writing there") from None
            raise
        _probe(path)
        _clear(path, overwrite)
        imgdir = ImageDir(path, pages_sink, durable)
        try:
            yield imgdir
        except BaseException as exc:
            imgdir.discard("interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc))
            if created:
                with contextlib.suppress(OSError):
                    os.rmdir(path)
            raise
    finally:
        os.close(dfd)


def _probe(path):
    """Fail before freezing anything if the directory cannot take files."""
    probe = os.path.join(path, f".pycr-probe-{os.getpid()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PycrError(f"cannot write images to {path}: {exc.strerror}") from None


def _clear(path, overwrite):
    names, temps = image_files(path)
    for name in temps:
        log.info("%s: removing %s, left by an interrupted dump", path, name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(path, name))
    if not names:
        return
    if not overwrite:
        what = ("an image set" if manifest.NAME in names
                else "image files of an unfinished dump (no manifest.img)")
        raise PycrError(f"{path}: holds {what} already; dump into a new directory, remove it, "
                        "or pass --overwrite to replace it")
    log.info("%s: --overwrite: removing the %d files of the set there", path, len(names))
    names.sort(key=lambda n: n != manifest.NAME)
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(path, name))
        if name == manifest.NAME:
            fsync_dir(path)
    fsync_dir(path)

