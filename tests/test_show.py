"""pycr show: a whole dump directory or one image, as text and as JSON."""

import io
import json
import os

import pytest

from pycr import formats, images
from pycr.errors import ImageError
from pycr.formats import FORMAT_VERSION
from pycr.show import show

from test_formats import CHILD, ROOT, SAMPLES, THREAD2, sample_pagemap


@pytest.fixture
def dump_dir(tmp_path):
    directory = images.ImageDir(tmp_path / "dump")
    for kind, make in SAMPLES.items():
        directory.write(kind, make())
    directory.write("core", dict(SAMPLES["core"](), pid=CHILD, comm="child", threads=SAMPLES["core"]()["threads"][:1]))
    with directory.pages_writer(ROOT) as f:
        f.write(b"\xaa" * (6 * 4096))
    return directory


def run_show(path, **kwargs):
    out = io.StringIO()
    show(path, out=out, **kwargs)
    return out.getvalue()


def test_text_of_a_directory_shows_every_image_in_order(dump_dir):
    text = run_show(dump_dir.path)
    headers = [line.split()[1] for line in text.splitlines() if line.startswith("== ")]
    fixed = ["inventory.img", "pstree.img", "files.img", "pipes-data.img", "manifest.img"]
    per_task = {"core", "mm", "pagemap", "tracker"}
    objects = sorted(formats.file_name(kind) for kind in SAMPLES if kind not in per_task and
                     formats.file_name(kind) not in fixed)       # kernel objects' images, by name
    assert headers == fixed + objects + [
                       f"core-{ROOT}.img", f"mm-{ROOT}.img", f"pagemap-{ROOT}.img", f"pages-{ROOT}.img",
                       f"tracker-{ROOT}.img", f"core-{CHILD}.img"]
    # inventory and pstree
    assert "pre-dump" in text and "uffd-wp" in text
    assert f"{ROOT:>7} {1:>7} {ROOT:>7} {ROOT:>7}" in text and f"{ROOT},{THREAD2}" in text
    assert "(leader exited, status 0x300)  (fd table shared with its parent)" in text
    assert f"{CHILD + 2:>7} {ROOT:>7}" in text and "zombie, exit 42" in text
    # core: registers in hex, limits, handlers, pending signals
    assert "comm 'counter'" in text and "comm 'child'" in text
    assert "rip 00007f3a1230d7fa" in text
    assert "rax fffffffffffffdfc" in text
    assert "NOFILE      1024 / 20000" in text and "CPU         unlimited / unlimited" in text
    assert "SIGUSR1      0x55d0c0de1234" in text and "SIGPIPE      SIG_IGN" in text
    assert "SIGUSR2 code=-6" in text
    assert "xstate 832 bytes: 7f 03" in text
    # mm: VMAs like /proc/PID/maps
    assert "55d0c0de1000-55d0c0de2000 r-xp 00001000 fe:01 393220" in text
    assert "7f3a12000000-7f3a12100000 rw-s" in text and "shmem 2051" in text
    assert "[vdso]" in text
    # pagemap runs as ranges with their place in the pages file
    assert "55d0c1f3b000-55d0c1f5c000     33 pages  in parent" in text
    assert "7ffc8a2b0000-7ffc8a2b4000      4 pages  at 0x2000 in pages file" in text
    # pages summarized, blobs abridged
    assert "24576 bytes, 6 pages" in text
    assert "aaaa" not in text
    assert "pipe 51234 size 65536: 39 bytes: 68 65 6c 6c 6f 00 ff" in text
    # manifest: the set's identity and every file's checksum
    assert "set 000102030405060708090a0b0c0d0e0f  parent -" in text
    assert f"pages-{ROOT}.img" in text and "1 CRC-32C sums" in text
    # files
    assert "3 reg" in text and "(deleted)" in text and "rdev 1:3" in text


def test_json_of_a_directory_is_one_object_per_image(dump_dir):
    doc = json.loads(run_show(dump_dir.path, json=True))
    assert list(doc)[:2] == ["inventory.img", "pstree.img"]
    assert doc[f"pages-{ROOT}.img"] == {"kind": "pages", "size": 6 * 4096}
    core = doc[f"core-{ROOT}.img"]
    assert core["kind"] == "core" and core["version"] == FORMAT_VERSION
    assert core["body"]["threads"][0]["regs"]["rip"] == 0x7F3A1230D7FA
    assert len(bytes.fromhex(core["body"]["threads"][0]["xstate"])) == 832
    # each image's JSON goes back to the very same bytes
    rebuilt = images.from_json(json.dumps(core))
    assert images.build("core", rebuilt) == open(dump_dir.path_of("core", ROOT), "rb").read()


def test_single_file_text_and_json(dump_dir):
    text = run_show(dump_dir.path_of("pagemap", ROOT))
    assert text.startswith(f"== pagemap-{ROOT}.img (pagemap, format {FORMAT_VERSION})")
    assert f"owner {ROOT}  runs 3  pages 39" in text
    doc = json.loads(run_show(dump_dir.path_of("pagemap", ROOT), json=True))
    assert doc["kind"] == "pagemap"
    assert doc["body"]["entries"] == [dict(vaddr=r.vaddr, nr_pages=r.nr_pages, in_parent=r.in_parent)
                                      for r in sample_pagemap()["entries"]]
    assert "6 pages" in run_show(dump_dir.pages_path(ROOT))


def test_broken_image_in_a_directory_is_reported_after_the_rest(dump_dir):
    path = dump_dir.path_of("mm", ROOT)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:40])
    out = io.StringIO()
    with pytest.raises(ImageError, match="truncated mm image"):
        show(dump_dir.path, out=out)
    text = out.getvalue()
    assert "error:" in text and "truncated mm image" in text
    assert f"core-{CHILD}.img" in text       # later images still shown


def test_missing_and_foreign_paths_raise_image_error(tmp_path):
    with pytest.raises(ImageError, match="no such file or directory"):
        show(tmp_path / "nothing", out=io.StringIO())
    foreign = tmp_path / "true.img"
    with open("/bin/true", "rb") as f:
        foreign.write_bytes(f.read(64))
    with pytest.raises(ImageError, match="not a pycr image"):
        show(foreign, out=io.StringIO())
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ImageError, match="^" + str(tmp_path / "empty") + ": no pycr images in this directory$"):
        show(tmp_path / "empty", out=io.StringIO())
