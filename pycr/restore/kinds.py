"""Kernel objects behind an fd that are neither files nor pipes: which module restores each.

A restore module (one per kind, beside its collect module) has:

- `TYPE`, `IMAGE`: as its collect module;
- `check(path, body, recs)`: at load, before any task exists; raises ImageError(path, why) for a
  body that is corrupt or does not match the fd records of its TYPE (recs: [(pid, rec)]);
- `Objects(images, body)`: made once per restore, when the descriptions are opened; it has
  `open(rec) -> fd`: a new fd in pycr for the description behind rec (called once per file_id;
  Descriptions owns and closes the fd it returns); `in_task(remote, pid, recs)`: optional, run in
  each process once its fds are in place (recs: its fds of this TYPE), for state that is keyed by
  the task's own fd numbers (epoll registrations); and `close()`: drop what pycr still holds.
"""

#: The restore modules, one per kind.
from pycr.restore import eventfd, eventpoll, inetsk, inotify, memfd, signalfd, timerfd, unixsk

MODULES = (eventfd, eventpoll, signalfd, timerfd, inotify, memfd, unixsk, inetsk)

TYPES = {m.TYPE: m for m in MODULES}


def images_needed(fds_by_pid):
    """{image kind: module} of every kind the fds of the set hold."""
    needed = {}
    for recs in fds_by_pid.values():
        for rec in recs:
            module = TYPES.get(str(rec.type))
            if module is not None:
                needed[module.IMAGE] = module
    return needed


def check_all(imgdir, fds_by_pid):
    """Read and check the image of every kind the set holds: {image kind: body}."""
    bodies = {}
    for image, module in images_needed(fds_by_pid).items():
        body = imgdir.read(image)
        recs = [(pid, rec) for pid, fds in fds_by_pid.items() for rec in fds if str(rec.type) == module.TYPE]
        module.check(imgdir.path_of(image), body, recs)
        bodies[image] = body
    return bodies


class KindObjects:
    """The Objects of every kind of one restore, made as their first fd is opened."""

    def __init__(self, images):
        self.images = images
        self.made = {}

    def of(self, type_name):
        if type_name not in self.made:
            module = TYPES[type_name]
            self.made[type_name] = module.Objects(self.images, self.images.objects[module.IMAGE])
        return self.made[type_name]

    def open(self, rec):
        return self.of(str(rec.type)).open(rec)

    def in_task(self, remote, pid, fds):
        for type_name, objects in self.made.items():
            hook = getattr(objects, "in_task", None)
            recs = [rec for rec in fds if str(rec.type) == type_name]
            if hook is not None and recs:
                hook(remote, pid, recs)

    def close(self):
        for objects in self.made.values():
            objects.close()
        self.made.clear()
