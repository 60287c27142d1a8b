"""The manifest that seals an image set, and the checks that a set is whole and its own.

A dump writes manifest.img last (after every other file is durable), listing
every file with its size and checksum, the set's random ID and its parent's.
A reader trusts nothing of a directory before verify() passes: a set without
a valid manifest is unfinished, a file whose checksum differs is corrupt, a
file the manifest does not list comes from another dump, and a parent whose
ID differs from the one recorded is not the pass this one was taken after.
"""

import array
import os
import stat

from . import checksum, images, stats
from .errors import ImageError
from .formats import manifest as fmt
from .native.core import crc32c

NAME = fmt.FILE_NAME
NO_ID = bytes(fmt.ID_SIZE)
MAX_CHAIN = 256


def new_set_id():
    return os.urandom(fmt.ID_SIZE)


def seal(imgdir, parent_set_id=NO_ID, set_id=None):
    """Write manifest.img for every file imgdir wrote; durable (file and directory fsynced)
    unless the set need not be (ImageDir.durable).

    Returns the set ID.
    """
    set_id = set_id or new_set_id()
    imgdir.commit()
    imgdir.make_durable()
    files = [{"name": name, "size": w.size, "digest": w.digest, "sums": w.sums}
             for name, w in sorted(imgdir.written.items())]
    stats.count("image bytes", sum(w.size for w in imgdir.written.values()))
    body = {"set_id": set_id, "parent_set_id": parent_set_id, "chunk_size": checksum.PAGES_CHUNK,
            "files": files, "digest": NO_ID}
    images.write_atomic(os.path.join(imgdir.path, NAME), _with_digest(images.build("manifest", body)),
                        None if imgdir.durable else [])
    return set_id


def _with_digest(data):
    """The manifest bytes with its closing digest filled in."""
    head = data[:-fmt.DIGEST_SIZE]
    return head + checksum.digest(head)


def _criu_set(path):
    try:
        with open(os.path.join(path, "inventory.img"), "rb") as f:
            return images.is_criu_magic(f.read(4))
    except OSError:
        return False


def read(path):
    """The parsed manifest of the image dir at path, its own digest checked."""
    where = os.path.join(path, NAME)
    try:
        with open(where, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        if _criu_set(path):
            raise ImageError(path, "criu's images (inventory.img has criu's magic): pycr reads only its "
                                   "own; restore them with criu") from None
        raise ImageError(where, "missing: the image set is incomplete (its dump did not finish) "
                                "or older than format 2") from None
    except OSError as exc:
        raise ImageError(where, f"cannot read: {exc.strerror}") from None
    obj = images.parse(data, "manifest", where)
    if checksum.digest(data[:-fmt.DIGEST_SIZE]) != bytes(obj.digest):
        raise ImageError(where, "checksum mismatch: the manifest is corrupt or was edited")
    return obj


def verify(path, deep=True, pages_elsewhere=False, arriving=()):
    """Check that the image dir at path is exactly the set its manifest lists -> manifest.

    deep: also check every pages file chunk by chunk (reads them whole);
    otherwise their sizes only. Raises ImageError naming the first bad file.
    pages_elsewhere: a listed pages file may be missing (a dump's own check of its
    parent, whose pages went to a page server); one that is here is checked.
    arriving: names of pages files that are still on their way (pycr serve writes them into
    the replica as they come, each chunk checked by an ArrivingCheck of this manifest): each
    must be listed and not here yet; everything else is checked as usual.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ImageError(path, images.not_a_directory(path))
    man = read(path)
    if man.chunk_size <= 0 or man.chunk_size % images.PAGE_SIZE:
        raise ImageError(os.path.join(path, NAME), f"corrupt: chunk size {man.chunk_size}")
    listed = {}
    for entry in man.files:
        if entry.name in listed or images.classify_name(entry.name) is None or entry.name == NAME:
            raise ImageError(os.path.join(path, NAME), f"corrupt: lists {entry.name!r}")
        listed[entry.name] = entry
    for name in sorted(os.listdir(path)):
        if name != NAME and images.classify_name(name) is not None and name not in listed:
            raise ImageError(os.path.join(path, name),
                             "not listed in manifest.img: a file of another dump, not of this set")
    pages = []
    for name in arriving:
        kind = images.classify_name(name)
        if name not in listed or kind is None or kind.kind != "pages":
            raise ImageError(os.path.join(path, NAME), f"does not list the pages file {name}")
        if os.path.lexists(os.path.join(path, name)):
            raise ImageError(os.path.join(path, name), "is here already, but was to arrive after the rest of the set")
        if len(listed[name].sums) != 4 * -(-listed[name].size // man.chunk_size):
            raise ImageError(os.path.join(path, name), "corrupt entry in manifest.img: wrong number of checksums")
    for name, entry in listed.items():
        where = os.path.join(path, name)
        if name in arriving:
            continue
        if pages_elsewhere and images.classify_name(name).kind == "pages" and not os.path.lexists(where):
            continue
        if _verify_file(where, entry, man.chunk_size) and deep:
            pages.append((where, entry))
    # every pages file at once: their reads overlap (checksum.sums_of_files)
    sums = checksum.sums_of_files([where for where, _ in pages], man.chunk_size)
    for (where, entry), have in zip(pages, sums):
        _compare_sums(where, entry, have.tobytes(), man.chunk_size)
    return man


def _compare_sums(where, entry, have, chunk):
    if have != bytes(entry.sums):
        want = len(entry.sums) // 4
        bad = next((i for i in range(want) if have[4 * i:4 * i + 4] != entry.sums[4 * i:4 * i + 4]), want)
        _bad_chunk(where, entry, bad, chunk)


def _bad_chunk(where, entry, index, chunk):
    raise ImageError(where, f"checksum mismatch in bytes {index * chunk}-"
                            f"{min((index + 1) * chunk, entry.size) - 1}: the pages are corrupt")


class ArrivingCheck:
    """The checks of one pages file that arrives a chunk at a time (verify()'s `arriving`):
    each chunk's CRC-32C against the manifest's before the chunk is used, and the size.

    Chunks come in order: check(data) takes the next one (chunk_size bytes, the last one
    shorter); done() says whether the file is complete."""

    def __init__(self, where, man, name):
        self.where = where
        self.entry = next(e for e in man.files if e.name == name)
        self.chunk = man.chunk_size
        self.index = 0
        self.size = 0

    def check(self, data):
        n = len(data)
        if self.size + n > self.entry.size:
            raise ImageError(self.where, f"corrupt: more than the {self.entry.size} bytes manifest.img lists")
        if n != min(self.chunk, self.entry.size - self.size):
            raise ValueError(f"{self.where}: chunk {self.index} checked with {n} bytes")
        want = bytes(self.entry.sums[4 * self.index:4 * self.index + 4])
        if array.array("I", [crc32c(data)]).tobytes() != want:
            _bad_chunk(self.where, self.entry, self.index, self.chunk)
        self.index += 1
        self.size += n

    def done(self):
        return self.size == self.entry.size


def _verify_file(where, entry, chunk):
    """Check one listed file but a pages file's sums -> True for a pages file (whose
    sums verify() then reads, all files at once)."""
    try:
        st = os.lstat(where)
    except FileNotFoundError:
        raise ImageError(where, "missing (manifest.img lists it)") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(where, "not a regular file")
    if st.st_size != entry.size:
        how = "truncated" if st.st_size < entry.size else "corrupt"
        raise ImageError(where, f"{how} or edited: {st.st_size} bytes, manifest.img says {entry.size}")
    if images.classify_name(os.path.basename(where)).kind == "pages":
        want = len(entry.sums) // 4
        if len(entry.sums) % 4 or want != -(-entry.size // chunk):
            raise ImageError(where, "corrupt entry in manifest.img: wrong number of checksums")
        return True
    with open(where, "rb") as f:
        data = f.read()
    if checksum.digest(data) != bytes(entry.digest):
        raise ImageError(where, "checksum mismatch: corrupt, or edited after the dump")
    return False


def verify_chain(path, deep=True, parents=True, arriving=()):
    """verify() the set at path and every set up its pre-dump chain -> [(dir, manifest)], newest first.

    Each parent must carry the set ID its child recorded. parents=False checks
    only the parent's ID (its files were checked when it was first read).
    arriving: pages files of the set at path still on their way (verify()).
    """
    here = os.path.normpath(os.fspath(path))
    man = verify(here, deep, arriving=arriving)
    chain = [(here, man)]
    seen = {os.path.realpath(here)}
    while True:
        parent = images.ImageDir(here).read("inventory").parent
        if not parent:
            if bytes(man.parent_set_id) != NO_ID:
                raise ImageError(os.path.join(here, NAME), "names a parent set but inventory.img names no parent")
            return chain
        up = os.path.normpath(os.path.join(here, parent))
        if os.path.realpath(up) in seen or len(chain) > MAX_CHAIN:
            raise ImageError(up, "the pre-dump chain loops")
        seen.add(os.path.realpath(up))
        if not os.path.isdir(up):
            raise ImageError(up, f"parent image directory of {here} is missing")
        parent_man = verify(up, deep) if parents else read(up)
        if bytes(parent_man.set_id) != bytes(man.parent_set_id):
            raise ImageError(up, f"is not the parent {here} was dumped after (set "
                                 f"{bytes(parent_man.set_id).hex()}, expected {bytes(man.parent_set_id).hex()})")
        chain.append((up, parent_man))
        if not parents:
            return chain
        here, man = up, parent_man


def reseal(path):
    """Write a new manifest for the files now in path, keeping its IDs.

    For research and tests that edit images on purpose: whoever can write the
    directory can do this, which is why restore also checks who owns it.
    """
    path = os.fspath(path)
    old = read(path)
    imgdir = images.ImageDir(path)
    for name in sorted(os.listdir(path)):
        kind = images.classify_name(name)
        if kind is None or name == NAME:
            continue
        where = os.path.join(path, name)
        if kind.kind == "pages":
            size = os.path.getsize(where)
            imgdir.written[name] = images.Written(size, b"", checksum.pages_sums(where).tobytes())
        else:
            with open(where, "rb") as f:
                data = f.read()
            imgdir.written[name] = images.Written(len(data), checksum.digest(data), b"")
    return seal(imgdir, bytes(old.parent_set_id), bytes(old.set_id))
