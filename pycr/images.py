"""Image files and image directories: parse, build, atomic writes, JSON.

An image file is the header (magic + format version) and a kind-specific body
declared in pycr.formats. Parsed images are construct Containers of the body;
they also carry `_kind` and `_version` keys (hidden from printing and JSON
bodies) so that they can be written or converted without naming the kind.
"""

import contextlib
import functools
import io
import json
import os
import re
import struct
import tempfile
from collections import namedtuple

from construct.core import ConstructError, EnumIntegerString, StreamError

from . import checksum, formats
from .errors import ImageError
from .stats import phase
from .formats import FORMAT_VERSION, HEADER_SIZE, KINDS, Header, kind_of_magic
from .formats.pagemap import PageRun
from .sysinfo import page_size

PAGE_SIZE = page_size()   # of this machine; the unit of pagemap runs (inventory.page_size)

_BUILD_ERRORS = (ConstructError, KeyError, TypeError, ValueError, AttributeError,
                 struct.error, UnicodeError, OverflowError)


# ---------------------------------------------------------------- bytes <-> Container

def build(kind, obj):
    """The bytes of an image of `kind` (header included) from a Container or dict."""
    image_kind = _image_kind(kind, "<build>")
    try:
        body = image_kind.schema.build(obj)
    except _BUILD_ERRORS as exc:
        raise ImageError(f"<{kind}>", f"cannot build {_a(kind)} image: {_build_why(exc)}") from None
    return Header.build(dict(magic=image_kind.magic, version=FORMAT_VERSION)) + body


#: kind -> the kind's schema compiled to Python by construct (compile_schemas): 3-4x faster to parse.
_compiled = {}


def compile_schemas(kinds):
    """Compile the schemas of `kinds` for parse(): worth it in a long-lived process that parses
    them on a hot path (pycr serve applies a final set in the downtime); compiling one costs
    about as much as a few hundred parses."""
    for kind in kinds:
        schema = KINDS[kind].schema
        if kind not in _compiled and schema is not None:
            _compiled[kind] = schema.compile()


def parse(data, kind=None, path="<bytes>"):
    """Parse image bytes; `kind` is the expected kind (None: whatever the magic says)."""
    found = check_header(data, kind, path)
    fast = _compiled.get(found)
    if fast is not None:
        stream = io.BytesIO(data)
        stream.seek(HEADER_SIZE)
        try:
            obj = fast.parse_stream(stream)
            if stream.tell() == len(data):      # else: bytes after its end, named below
                return _finish(obj, found)
        except Exception:       # noqa: BLE001 (the plain parser below names what is wrong)
            pass
    schema = KINDS[found].schema
    stream = io.BytesIO(data)
    stream.seek(HEADER_SIZE)
    try:
        obj = schema.parse_stream(stream)
    except StreamError as exc:
        raise ImageError(path, f"truncated {found} image: the data ends inside {_field_path(exc)}") from None
    except ConstructError as exc:
        raise ImageError(path, f"corrupt {found} image at {_field_path(exc)}: {_construct_why(exc)}") from None
    trailing = len(data) - stream.tell()
    if trailing:
        raise ImageError(path, f"corrupt {found} image: {trailing} unexpected bytes after its end")
    return _finish(obj, found)


def _finish(obj, kind):
    obj = _strip_io(obj)
    obj._kind = kind
    obj._version = FORMAT_VERSION
    return obj


#: the first u32 of criu's image files (criu/include/magic.h): common, service, and inventory.img's own
CRIU_MAGICS = {m.to_bytes(4, "little") for m in (0x54564319, 0x55105940, 0x58313116)}


def is_criu_magic(first4):
    return bytes(first4[:4]) in CRIU_MAGICS


def check_header(data, kind=None, path="<bytes>"):
    """The kind named by the header of `data`, after checking magic and version."""
    if len(data) < HEADER_SIZE:
        raise ImageError(path, f"truncated: {len(data)} bytes, shorter than the {HEADER_SIZE}-byte image header")
    header = Header.parse(data[:HEADER_SIZE])
    expected = kind is not None and KINDS.get(kind)
    found = kind if expected and expected.magic == bytes(header.magic) else kind_of_magic(header.magic)
    if found is None:
        if is_criu_magic(bytes(header.magic)):
            raise ImageError(path, "a criu image: pycr reads only its own (restore it with criu)")
        raise ImageError(path, f"not a pycr image (magic {bytes(header.magic)!r})")
    if kind is not None and found != kind:
        raise ImageError(path, f"{_a(found)} image where {_a(kind)} image was expected")
    _check_version(header.version, path)
    return found


def _check_version(version, path):
    if not isinstance(version, int) or version < 1:
        raise ImageError(path, f"format version {version!r} is not valid")
    if version > FORMAT_VERSION:
        raise ImageError(path, f"format version {version} is newer than this pycr reads ({FORMAT_VERSION})")


def _image_kind(kind, path):
    image_kind = KINDS.get(kind)
    if image_kind is None or image_kind.schema is None:
        raise ImageError(path, f"no image kind {kind!r} with a schema (kinds: {', '.join(_schema_kinds())})")
    return image_kind


def _schema_kinds():
    return [k for k, v in KINDS.items() if v.schema is not None]


def _a(word):
    """'a core' / 'an inventory'."""
    return ("an " if word[:1] in "aeiou" else "a ") + word


def _build_why(exc):
    """What was wrong with the object given to build, in one line."""
    if isinstance(exc, KeyError):
        return f"missing field {exc.args[0]!r}"
    if isinstance(exc, ConstructError) and getattr(exc, "path", None):
        return f"{_field_path(exc)}: {_construct_why(exc)}"
    return _construct_why(exc)


def _field_path(exc):
    """'threads -> regs' from construct's '(parsing) -> threads -> regs'."""
    where = getattr(exc, "path", None) or ""
    parts = [p.strip() for p in where.split("->") if p.strip() and not p.strip().startswith("(")]
    return ("field " + " -> ".join(parts)) if parts else "the body"


def _construct_why(exc):
    """The last line of a construct error, without its path preamble."""
    text = str(exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__) or type(exc).__name__


def _strip_io(obj):
    """Drop the '_io' stream references construct leaves in parsed Containers."""
    if isinstance(obj, dict):
        obj.pop("_io", None)
        for value in obj.values():
            if isinstance(value, (dict, list)):
                _strip_io(value)
    elif isinstance(obj, list) and obj and isinstance(obj[0], (dict, list)):
        for value in obj:
            _strip_io(value)
    return obj


def kind_of(obj, kind=None):
    """The kind of an image object: the given one, or the one it was parsed as."""
    kind = kind or (obj.get("_kind") if isinstance(obj, dict) else None)
    if kind is None:
        raise ValueError("image kind unknown: pass kind= for objects not read from an image")
    return kind


# ---------------------------------------------------------------- files

def load(path, kind=None):
    """Read and parse one image file; `kind` checks what it must be."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageError(path, "missing") from None
    except OSError as exc:
        raise ImageError(path, f"cannot read: {exc.strerror}") from None
    return parse(data, kind, path)


def dump(obj, path, kind=None):
    """Write one image file atomically (mode 0600)."""
    data = build(kind_of(obj, kind), obj)
    write_atomic(path, data)


def write_atomic(path, data, unsynced=None):
    """Temp file in the same dir, fsync, rename over `path`, fsync the dir (see _atomic_file
    for `unsynced`)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ImageError(path, "is a directory: name the image file to write")
    with _atomic_file(path, unsynced) as f:
        f.write(data)


@contextlib.contextmanager
def _atomic_file(path, unsynced=None):
    """A binary file that appears at `path` only if the block succeeds.

    unsynced (a list): the fsyncs are left to whoever holds the list (ImageDir.make_durable,
    before the manifest that makes a set valid is written), and path is appended to it."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    except OSError as exc:
        raise ImageError(path, f"cannot write it: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            yield f
            with phase("image write"):
                f.flush()
                if unsynced is None:
                    os.fsync(f.fileno())
        with phase("image write"):
            os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if unsynced is not None:
        unsynced.append(path)
        return
    with phase("image write"):
        fsync_dir(directory)


def fsync_files(paths, directory, threads=4):
    """fsync every file of paths (several at once: each waits on the device), then the directory."""
    def sync(path):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if len(paths) > 1 and threads > 1:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(min(threads, len(paths))) as pool:
            list(pool.map(sync, paths))
    else:
        for path in paths:
            sync(path)
    fsync_dir(directory)


def fsync_dir(directory):
    """Make a directory's entries (a file made, renamed or removed in it) durable."""
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# ---------------------------------------------------------------- JSON

def to_json(obj, kind=None, indent=None):
    """JSON text {"kind", "version", "body"}; blobs become hex strings."""
    kind = kind_of(obj, kind)
    version = obj.get("_version", FORMAT_VERSION) if isinstance(obj, dict) else FORMAT_VERSION
    return json.dumps({"kind": kind, "version": version, "body": to_plain(obj)}, indent=indent)


def to_plain(obj):
    """Plain JSON-able data: dicts, lists, ints, bools, strs (bytes as hex)."""
    if isinstance(obj, PageRun):
        return {"vaddr": obj.vaddr, "nr_pages": obj.nr_pages, "in_parent": obj.in_parent}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj).hex()
    if isinstance(obj, EnumIntegerString):
        return str(obj)
    return obj


def from_json(text, path="<json>"):
    """The image object that to_json() described; build() of it gives the same bytes."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ImageError(path, f"not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not {"kind", "version", "body"} <= doc.keys():
        raise ImageError(path, "not a pycr image in JSON (needs kind, version and body)")
    kind = doc["kind"]
    if KINDS.get(kind) is None or KINDS[kind].schema is None:
        raise ImageError(path, f"unknown image kind {kind!r}")
    _check_version(doc["version"], path)
    try:
        data = KINDS[kind].schema.build(doc["body"])
    except _BUILD_ERRORS as exc:
        raise ImageError(path, f"bad {kind} image: {_build_why(exc)}") from None
    return parse(Header.build(dict(magic=KINDS[kind].magic, version=FORMAT_VERSION)) + data, kind, path)


# ---------------------------------------------------------------- memory helpers

def iter_page_runs(pagemap, page_size=PAGE_SIZE):
    """Yield (vaddr, nr_pages, in_parent, offset) for every pagemap entry.

    offset is the byte offset of the run in pages-<owner>.img, or None for a
    run that lives in the parent image set: runs are laid out back to back in
    entry order, skipping those in the parent.
    """
    entries = pagemap["entries"] if isinstance(pagemap, dict) else pagemap
    offset = 0
    for entry in entries:
        vaddr, nr_pages, in_parent = (
            (entry["vaddr"], entry["nr_pages"], entry["in_parent"]) if isinstance(entry, dict) else entry)
        if in_parent:
            yield vaddr, nr_pages, True, None
        else:
            yield vaddr, nr_pages, False, offset
            offset += nr_pages * page_size


# ---------------------------------------------------------------- directories

Written = namedtuple("Written", "size digest sums")
Written.__doc__ = "A file an ImageDir wrote: bytes, BLAKE2b-128 (images) or CRC-32C sums (pages)."

ImageFile = namedtuple("ImageFile", "kind key name")
ImageFile.__doc__ = "A file of an image dir: kind, key (pid, owner or None), file name."

_GLOBAL_ORDER = ("inventory", "pstree", "files", "pipes-data", "manifest")
_PER_TASK_ORDER = ("core", "mm", "pagemap", "pages", "tracker")


def _name_regex(pattern):
    head, _, tail = pattern.partition("{")
    tail = tail.partition("}")[2]
    return re.compile(re.escape(head) + r"(?P<key>[^/]+?)" + re.escape(tail) + r"\Z")


@functools.cache
def _name_patterns():
    """({fixed file name: kind}, [(kind, regex of a per-task name)]), made on first use."""
    fixed = {k.pattern: kind for kind, k in KINDS.items() if "{" not in k.pattern}
    per_task = [(kind, _name_regex(k.pattern)) for kind, k in KINDS.items() if "{" in k.pattern]
    return fixed, per_task


def classify_name(name):
    """ImageFile for a file name of an image dir, or None if it is not one."""
    fixed, per_task = _name_patterns()
    if name in fixed:
        return ImageFile(fixed[name], None, name)
    for kind, regex in per_task:
        match = regex.match(name)
        if match:
            key = match.group("key")
            return ImageFile(kind, int(key) if key.isdigit() else key, name)
    return None


def is_process_pages(name):
    """True for pages-<pid>.img, a process's pages file (not a shared object's)."""
    kind = classify_name(name)
    return kind is not None and kind.kind == "pages" and isinstance(kind.key, int)


def _sort_key(image):
    if image.key is None:
        return (0, _GLOBAL_ORDER.index(image.kind) if image.kind in _GLOBAL_ORDER else 99, 0, image.name)
    numeric = isinstance(image.key, int)
    return (1 if numeric else 2, image.key if numeric else 0, _PER_TASK_ORDER.index(image.kind) if image.kind in _PER_TASK_ORDER else 99, str(image.key))


#: Bytes of pages a set that need not be durable writes through the page cache (ImageDir.pages_writer).
BUFFERED_PAGES_MAX = 64 << 20


class ImageDir:
    """One dump directory: every image of one dump or pre-dump pass.

    `written` records the size and checksum of every file this object wrote,
    for the manifest that seals the set (pycr.manifest.seal) and for removing
    them again if the dump fails (discard).
    """

    def __init__(self, path, pages_sink=None, durable=True):
        self.path = os.fspath(path)
        # A migration's passes are read back at once by the sender and never outlive the
        # migration: they need no fsync (durable=False), which would only add to the freeze.
        self.durable = durable
        self.written = {}            # file name -> Written
        # Files written but not yet fsynced: a set is valid only once its manifest is written,
        # so their fsyncs wait for make_durable, all at once, just before it.
        self.unsynced = []
        # Where pages files go instead of this directory: a net.page_client.PageServerClient.
        self.pages_sink = pages_sink
        # pages_done(file name), told of each pages file once it is whole in this directory
        # (a migration sends it on at once: net.image_sets.SetSender).
        self.pages_done = None

    def __repr__(self):
        return f"ImageDir({self.path!r})"

    def file_name(self, kind, name=None):
        """File name of an image; name is the pid/owner, or a file name ending in .img."""
        if isinstance(name, str) and name.endswith(".img"):
            return name
        if kind not in KINDS:
            raise ValueError(f"unknown image kind {kind!r}")
        return formats.file_name(kind, name)

    def path_of(self, kind, name=None):
        """Full path of an image in this directory."""
        return os.path.join(self.path, self.file_name(kind, name))

    def _ensure(self):
        os.makedirs(self.path, mode=0o700, exist_ok=True)

    def write(self, kind, obj, name=None):
        """Write an image atomically; per-task kinds take their key from obj if name is None."""
        if name is None and "{" in KINDS[kind].pattern:
            name = obj.get("owner") if kind == "pagemap" else obj.get("pid")
        with phase("image write"):
            data = build(kind, obj)
            self._ensure()
            path = self.path_of(kind, name)
            write_atomic(path, data, self.unsynced)
        self.written[os.path.basename(path)] = Written(len(data), checksum.digest(data), b"")
        return path

    def read(self, kind, name=None):
        """Parse one image of this directory, checking it is of `kind`."""
        return load(self.path_of(kind, name), kind)

    def exists(self, kind, name=None):
        return os.path.exists(self.path_of(kind, name))

    def pages_path(self, owner):
        """Path of the raw pages file of a pid or shmem owner."""
        return self.path_of("pages", owner)

    @contextlib.contextmanager
    def pages_writer(self, owner, size_hint=None):
        """A checksum.PagesFile for pages-<owner>.img; it appears only if the block succeeds.

        Its pages bypass the page cache (`direct`, see collect.memory.set_direct_io) unless
        the set need not be durable and size_hint (bytes about to be written) is at most
        BUFFERED_PAGES_MAX: without the fsync, a few MiB are copied into the page cache
        3-4x faster than written to the device, and a larger set would only fill the cache
        with dirty pages that writeback then throttles.

        Everything written to it is summed per chunk on the way (see PagesFile).
        With a pages_sink the file is written by the page server instead (a
        RemotePagesFile); it is recorded in `written` all the same, for the manifest.
        """
        if self.pages_sink is not None:
            name = self.file_name("pages", owner)
            with self.pages_sink.pages_file(name) as out:
                yield out
            self.written[name] = Written(out.tell(), b"", out.sums.sums().tobytes())
            return
        self._ensure()
        path = self.pages_path(owner)
        with _atomic_file(path, self.unsynced) as f:
            out = checksum.PagesFile(f)
            out.direct = self.durable or size_hint is None or size_hint > BUFFERED_PAGES_MAX
            yield out
            out.flush()
            size = os.fstat(f.fileno()).st_size
            if size != out.sums.pos:
                raise AssertionError(f"{path}: {size} bytes written but {out.sums.pos} summed")
        self.written[os.path.basename(path)] = Written(size, b"", out.sums.sums().tobytes())
        if self.pages_done is not None:
            self.pages_done(os.path.basename(path))

    def make_durable(self):
        """fsync every file written so far and the directory (manifest.seal, before the manifest);
        nothing for a set that need not be durable."""
        with phase("image write"):
            paths, self.unsynced = self.unsynced, []
            if not self.durable:
                return
            fsync_files([p for p in paths if os.path.exists(p)], self.path)

    def commit(self):
        """Before the manifest seals the set: a page server keeps the pages files it holds."""
        if self.pages_sink is not None:
            self.pages_sink.commit()

    def discard(self, reason=""):
        """Remove every file this object wrote (a failed dump leaves nothing of its own);
        a page server removes those it received (told `reason`, why the dump failed)."""
        if self.pages_sink is not None:
            self.pages_sink.abort(reason)
        for name in list(self.written):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.path, name))
            del self.written[name]
        with contextlib.suppress(OSError):
            fsync_dir(self.path)

    def list(self):
        """ImageFile for every image here, sorted: globals, then per pid, then shmem."""
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            raise ImageError(self.path, not_a_directory(self.path)) from None
        found = [image for image in map(classify_name, names) if image is not None]
        return sorted(found, key=_sort_key)

    def parent(self):
        """The ImageDir of the previous pass (inventory.parent), or None."""
        inventory = self.read("inventory")
        if not inventory.parent:
            return None
        return ImageDir(os.path.normpath(os.path.join(self.path, inventory.parent)))


def not_a_directory(path):
    """Why path cannot be an image directory: missing, or a file where a directory is expected."""
    if os.path.exists(path) and not os.path.isdir(path):
        return "not a directory (an image set is a directory; `pycr show FILE` reads one image)"
    return "no such image directory"


def encode_json_file(src, dst):
    """`pycr encode`: the JSON of one image (a file, or - for stdin) back into its bytes at dst."""
    import sys
    if src == "-":
        text, where = sys.stdin.read(), "<stdin>"
    else:
        try:
            with open(src, encoding="utf-8") as f:
                text, where = f.read(), src
        except OSError as exc:
            raise ImageError(src, exc.strerror) from None
    dump(from_json(text, where), dst)


def read_memory(imgdir, owner, addr, length):
    """The saved bytes of [addr, addr+length) of owner (a pid or shmem-<id>), following
    in_parent runs down a pre-dump chain. Pages saved nowhere read as zeros.

    For tests and for research: what a restore would put at that address, read by
    the restorer's own resolver of in_parent runs (pycr.restore.memory.PageChain).
    """
    from pycr.restore.memory import PageChain      # it imports this module
    chain = PageChain(imgdir if isinstance(imgdir, ImageDir) else ImageDir(imgdir))
    try:
        return chain.read(owner, addr, length)
    finally:
        chain.close()
