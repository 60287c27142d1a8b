"""The few exception types pycr raises for expected failures.

Every layer maps kernel errors onto these so that the CLI can print one line
naming the cause and exit non-zero; any other exception is a bug.
"""

import errno as _errno


class PycrError(Exception):
    """An expected failure with a message fit for a one-line error."""


class TaskGone(PycrError):
    """The task exited, or never existed."""

    def __init__(self, pid, detail=""):
        self.pid = pid
        super().__init__(f"pid {pid}: no such process" + (f" ({detail})" if detail else ""))


class AccessDenied(PycrError):
    """The kernel refused: permissions, or the task is traced by someone else."""


class Unsupported(PycrError):
    """A resource pycr cannot checkpoint or restore yet, named."""


class ImageError(PycrError):
    """An image is missing, truncated, corrupt, foreign or from a newer format."""

    def __init__(self, path, why):
        self.path = str(path)
        super().__init__(f"{path}: {why}")


class RestoreError(PycrError):
    """The restore cannot proceed (a PID is taken, a file is gone, ...)."""


class KernelFeatureMissing(PycrError):
    """The running kernel lacks what was asked for."""

    def __init__(self, feature, why):
        self.feature = feature
        super().__init__(f"{feature} is not available: {why}")


class StopTimeout(PycrError, TimeoutError):
    """A task did not reach a ptrace stop in time (a loaded machine: PYCR_FREEZE_TIMEOUT).

    Also a TimeoutError, which is what callers of the ptrace layer caught before."""


class Interrupted(KeyboardInterrupt):
    """pycr was told to stop (SIGINT, SIGTERM, SIGHUP) and undid what it had begun.

    A KeyboardInterrupt, so that every rollback path written for Ctrl-C runs."""

    def __init__(self, signum):
        self.signum = signum
        super().__init__(signum)


def from_oserror(exc, pid=None, what=""):
    """Map an OSError raised while touching task `pid` onto a PycrError."""
    code = getattr(exc, "errno", None)
    label = f"pid {pid}: {what}" if pid is not None and what else what or (f"pid {pid}" if pid is not None else "")
    if code in (_errno.ESRCH, _errno.ENOENT) and pid is not None:
        return TaskGone(pid, what)
    if code in (_errno.EPERM, _errno.EACCES):
        return AccessDenied(f"{label}: {exc.strerror or 'permission denied'}")
    return PycrError(f"{label}: {exc.strerror or exc}" if label else str(exc))
