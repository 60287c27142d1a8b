"""Dirty-page trackers: which pages changed since the previous pass of a chain.

make_tracker(name, parent) -> Tracker. name is "uffd-wp", "soft-dirty",
"hash" or "auto" (the parent pass's tracker, else the best the kernel offers,
per pycr.check.trackers_available). The interface is in trackers.base.
"""

from ..errors import KernelFeatureMissing, PycrError

NAMES = ("uffd-wp", "soft-dirty", "hash")


def _classes():
    from .hashing import HashTracker
    from .softdirty import SoftDirtyTracker
    from .uffd import UffdWpTracker
    return {"uffd-wp": UffdWpTracker, "soft-dirty": SoftDirtyTracker, "hash": HashTracker}


def resolve(name, parent=None):
    """The tracker name to use for `name` given the parent pass (or None)."""
    previous = parent.inventory.tracker if parent else ""
    if name == "auto":
        if previous:
            return previous
        from ..check import check_pagemap_scan, check_soft_dirty, check_uffd_wp_async, trackers_available
        return trackers_available([check_uffd_wp_async(), check_pagemap_scan(), check_soft_dirty()])[0]
    if name not in NAMES:
        raise PycrError(f"unknown tracker {name!r} (choose from auto, {', '.join(NAMES)})")
    if previous and previous != name:
        raise PycrError(f"the parent pass {parent.imgdir.path} was tracked with {previous}; "
                        f"use --tracker {previous} or auto")
    return name


def make_tracker(name, parent=None):
    """A Tracker for this pass; KernelFeatureMissing if the kernel cannot do it."""
    name = resolve(name, parent)
    if name == "uffd-wp":
        from ..check import check_pagemap_scan, check_uffd_wp_async
        for finding in (check_uffd_wp_async(), check_pagemap_scan()):
            if not finding.ok:
                raise KernelFeatureMissing(f"uffd-wp tracking ({finding.name})", finding.detail)
    return _classes()[name](parent)


__all__ = ["NAMES", "ParentPass", "Tracker", "make_tracker", "resolve", "KernelFeatureMissing"]


def __getattr__(name):
    """ParentPass and Tracker (trackers.base), imported when first named: a restore needs only trackers.runs."""
    if name in ("ParentPass", "Tracker"):
        from . import base
        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
