"""Kernel objects behind an fd that are neither files nor pipes: which module restores each.

A restore module (one per kind, beside its collect module) has:

- `TYPE` (or `TYPES`), `IMAGE`: as its collect module;
- `check(path, body, recs)`: at load, before any task exists; raises ImageError(path, why) for a
  body that is corrupt or does not match the fd records of its TYPE (recs: [(pid, rec)]);
- `Objects(images, body)`: made once per restore, when the descriptions are opened; it has
  `open(rec) -> fd`: a new fd in pycr for the description behind rec (called once per file_id;
  Descriptions owns and closes the fd it returns); `in_task(remote, pid, recs)`: optional, run in
  each process once its fds are in place (recs: its fds of this TYPE), for state that is keyed by
  the task's own fd numbers (epoll registrations); and `close()`: drop what pycr still holds.
  Terminals add optional hooks about sessions, which the restorer calls through KindObjects:
  `in_session(remote, pid, pidfd)` in a session leader right after its setsid (before it forks),
  `after_groups(tasks, pidfd)` once every process group exists, `late_sessions(tasks, pidfd,
  recreate)` when the tree was made before the descriptions (incremental restore; recreate(pids)
  forks those processes again from their parents), `sessions()` the session leaders that
  late_sessions will handle, and `before_release(tasks)` just before the tree runs.
"""

import importlib

#: {fd type: the name of its module}, the same as the collect side's; a restore module is imported
#: only when the set holds an fd of its kind.
from pycr.collect.kinds import TYPES


def module_of(type_name):
    """The restore module of an fd type (in TYPES), imported on first use."""
    return importlib.import_module(f"pycr.restore.{TYPES[type_name]}")


def images_needed(fds_by_pid):
    """{image kind: module} of every kind the fds of the set hold."""
    needed = {}
    for recs in fds_by_pid.values():
        for rec in recs:
            if str(rec.type) in TYPES:
                module = module_of(str(rec.type))
                needed[module.IMAGE] = module
    return needed


def check_all(imgdir, fds_by_pid):
    """Read and check the image of every kind the set holds: {image kind: body}."""
    bodies = {}
    for image, module in images_needed(fds_by_pid).items():
        body = imgdir.read(image)
        recs = [(pid, rec) for pid, fds in fds_by_pid.items() for rec in fds
                if str(rec.type) in TYPES and module_of(str(rec.type)) is module]
        module.check(imgdir.path_of(image), body, recs)
        bodies[image] = body
    return bodies


class KindObjects:
    """The Objects of every kind of one restore, made as their first fd is opened."""

    def __init__(self, images):
        self.images = images
        self.made = {}

    def of(self, type_name):
        module = module_of(type_name)
        if module not in self.made:
            self.made[module] = module.Objects(self.images, self.images.objects[module.IMAGE])
        return self.made[module]

    def open(self, rec):
        return self.of(str(rec.type)).open(rec)

    def in_task(self, remote, pid, fds):
        for module, objects in self.made.items():
            hook = getattr(objects, "in_task", None)
            recs = [rec for rec in fds if str(rec.type) in TYPES and module_of(str(rec.type)) is module]
            if hook is not None and recs:
                hook(remote, pid, recs)

    def _each(self, hook_name, *args):
        for objects in list(self.made.values()):
            hook = getattr(objects, hook_name, None)
            if hook is not None:
                hook(*args)

    def in_session(self, remote, pid, pidfd):
        self._each("in_session", remote, pid, pidfd)

    def after_groups(self, tasks, pidfd):
        self._each("after_groups", tasks, pidfd)

    def late_sessions(self, tasks, pidfd, recreate=None):
        self._each("late_sessions", tasks, pidfd, recreate)

    def sessions(self):
        """Session leaders whose controlling terminal is one of the objects (late_sessions handles them)."""
        out = set()
        for objects in self.made.values():
            out |= getattr(objects, "sessions", set)()
        return out

    def before_release(self, tasks):
        self._each("before_release", tasks)

    def close(self):
        for objects in self.made.values():
            objects.close()
        self.made.clear()
