"""Kernel features some tests need, asked of `pycr check`: a test skips with the
reason pycr check gives instead of failing on a kernel without the feature."""

from functools import lru_cache

import pytest

NEEDS = {"uffd-wp": ("userfaultfd WP_ASYNC", "PAGEMAP_SCAN"), "soft-dirty": ("soft-dirty",)}


@lru_cache(maxsize=None)
def _findings():
    from pycr.check import check_pagemap_scan, check_soft_dirty, check_uffd_wp_async
    return tuple(check() for check in (check_uffd_wp_async, check_pagemap_scan, check_soft_dirty))


def require_tracker(name):
    """Skip the calling test unless the dirty-page tracker `name` works here."""
    if name not in NEEDS:
        return                      # hash: works anywhere
    missing = [f for f in _findings() if f.name in NEEDS[name] and not f.ok]
    if missing:
        why = "; ".join(f"{f.name}: {f.detail}" for f in missing)
        pytest.skip(f"no {name} tracker on this kernel (pycr check: {why})")
