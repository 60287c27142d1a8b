"""Kernel objects behind an fd that are neither files nor pipes: which module reads each.

Every such kind (a unix socket, an epoll set, an eventfd, ...) has one module
in pycr/collect/, one in pycr/restore/ and one image format in formats/. A
collect module has:

- `TYPE`: its fd type in files.img; `IMAGE`: the image kind it writes; a module whose one image
  holds several fd types (a pty's master and slave) lists them in `TYPES` instead;
- `matches(pid, fd, target, st) -> bool`: is this fd (readlink target, fstat) one of mine?
  (with TYPES, it returns the fd type, or None);
- `collect(objects) -> body`: the image body for every object of the tree. `objects` is a list of
  `Held`, one per open file description (fds that share one after dup or fork are one Held);
  it raises Unsupported naming the pid and fd for a state it cannot bring back.

The dump asks `kind_of` while it describes each fd, and `collect_objects`
once the fds are numbered, before anything is written: a refusal leaves no file.

A module is imported only when the tree has an fd it could claim (see MODULES), so a
dump pays only for the kinds its tree holds.
"""

import importlib
import stat
from dataclasses import dataclass, field

from ..log import log

#: Modules in the order their kind is asked, each with what an fd must be for its `matches` to be
#: asked: an anon inode's readlink target, or a file type. A module may only claim what it can restore.
MODULES = (
    ("eventfd", "anon_inode:[eventfd]"),
    ("eventpoll", "anon_inode:[eventpoll]"),
    ("signalfd", "anon_inode:[signalfd]"),
    ("timerfd", "anon_inode:[timerfd]"),
    ("inotify", "anon_inode:inotify"),
    ("memfd", stat.S_IFREG),
    ("unixsk", stat.S_IFSOCK),
    ("inetsk", stat.S_IFSOCK),
    ("tty", stat.S_IFCHR),
)

#: {fd type in files.img: the module (of pycr/collect/ and of pycr/restore/) that reads and makes it}
TYPES = {name: name for name, _ in MODULES if name != "tty"} | {"ptmx": "tty", "pts": "tty"}


def module(name):
    """The collect module of a kind, imported on first use."""
    return importlib.import_module(f"{__package__}.{name}")


@dataclass
class Held:
    """One open file description of a kind: its record, and every (pid, fd) that holds it."""
    file_id: int
    rec: dict
    holders: list = field(default_factory=list)     # [(pid, fd)], the first one is `pid, fd`

    @property
    def pid(self):
        return self.holders[0][0]

    @property
    def fd(self):
        return self.holders[0][1]


def types_of(module):
    """The fd types a module reads."""
    return getattr(module, "TYPES", None) or (module.TYPE,)


def kind_of(pid, fd, target, st):
    """(collect module, fd type) of the kind this fd is, or (None, None)."""
    for name, what in MODULES:
        if what != (target if isinstance(what, str) else stat.S_IFMT(st.st_mode)):
            continue
        kind = module(name)
        found = kind.matches(pid, fd, target, st)
        if found:
            return kind, (found if isinstance(found, str) else kind.TYPE)
    return None, None


def collect_objects(files_by_pid):
    """{image kind: body} for every kind the tree holds, each object read once."""
    by_module = {}
    for pid, recs in files_by_pid.items():
        for rec in recs:
            name = TYPES.get(rec["type"])
            if name is None:
                continue
            held = by_module.setdefault(module(name), {}).setdefault(rec["file_id"], Held(rec["file_id"], rec))
            held.holders.append((pid, rec["fd"]))
    bodies = {}
    for kind, objects in by_module.items():
        bodies[kind.IMAGE] = kind.collect(list(objects.values()))
        log.info("%d %s object(s) read", len(objects), kind.IMAGE)
    return bodies
