"""The lazy registries name every kind as its modules do (they are imported only on first use)."""

import importlib

from pycr import formats
from pycr.collect import kinds as collect_kinds
from pycr.restore import kinds as restore_kinds


def test_fd_types_match_their_modules():
    for name, _ in collect_kinds.MODULES:
        for side in ("collect", "restore"):
            mod = importlib.import_module(f"pycr.{side}.{name}")
            for fd_type in getattr(mod, "TYPES", None) or (mod.TYPE,):
                assert collect_kinds.TYPES[fd_type] == name, (side, name, fd_type)
    assert set(collect_kinds.TYPES.values()) == {name for name, _ in collect_kinds.MODULES}
    for fd_type in collect_kinds.TYPES:
        assert restore_kinds.module_of(fd_type).IMAGE == collect_kinds.module(collect_kinds.TYPES[fd_type]).IMAGE


def test_image_kinds_match_their_modules():
    for name in formats.MODULES:
        kind = formats.KINDS[name]
        assert kind.name == name and kind.magic and kind.schema is not None
        assert formats.kind_of_magic(kind.magic) == name
    assert formats.KINDS["pages"].schema is None and "pages" in formats.KINDS
    assert formats.files.Body is formats.KINDS["files"].schema      # a kind's module by attribute, too
