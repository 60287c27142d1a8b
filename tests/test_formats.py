"""Image formats: every kind round-trips byte for byte, bad files fail cleanly."""

import json
import os
import stat
import struct

import pytest

from pycr import images
from pycr.native import core
from pycr.errors import ImageError
from pycr.formats import FORMAT_VERSION, HEADER_SIZE, KINDS, kind_of_file, kind_of_magic
from pycr.formats.common import REGISTER_NAMES
from pycr.formats.pagemap import PageRun

U64_MAX = 2**64 - 1
ROOT, THREAD2, CHILD = 4242, 4243, 4251


def siginfo(signo, code=0, pid=0, uid=0):
    """A 128-byte siginfo_t as PEEKSIGINFO returns it (si_pid/si_uid at 16/20)."""
    head = struct.pack("<iii4xiI", signo, 0, code, pid, uid)
    return head + bytes(128 - len(head))


def xstate():
    """An 832-byte NT_X86_XSTATE area: XCR0 = 7 at 464, xstate_bv at 512."""
    area = bytearray(832)
    area[0:2] = struct.pack("<H", 0x037F)          # fcw
    area[24:28] = struct.pack("<I", 0x1F80)        # mxcsr
    area[160:176] = bytes(range(16))               # xmm0
    area[464:472] = struct.pack("<Q", 7)
    area[512:520] = struct.pack("<Q", 7)
    return bytes(area)


def regs(rip, rsp, rax=0, orig_rax=U64_MAX):
    values = {name: 0 for name in REGISTER_NAMES}
    values.update(rip=rip, rsp=rsp, rax=rax, orig_rax=orig_rax, cs=0x33, ss=0x2B,
                  eflags=0x246, fs_base=0x7F3A12345740, rbx=0x1122334455667788)
    return values


def sample_inventory():
    return dict(pycr_version="0.1.0", kernel="6.18.44-fc-v657", page_size=4096, root_pid=ROOT,
                root_start_time=987654, kind="pre-dump", tracker="uffd-wp", parent="../pass-0",
                pass_nr=1, created=1732575600123456789,
                cpu=dict(vendor="GenuineIntel", model="Sample CPU", xcr0=0x7, xstate_size=832,
                         xstate_components=[dict(index=2, offset=576, size=256)]))


def sample_pstree():
    return dict(processes=[
        dict(pid=ROOT, ppid=1, pgid=ROOT, sid=ROOT, start_time=987654, threads=[ROOT, THREAD2]),
        dict(pid=CHILD, ppid=ROOT, pgid=ROOT, sid=ROOT, start_time=987700, threads=[CHILD + 1],
             leader_exited=True, leader_exit_code=3 << 8, shares_files=True),
    ], zombies=[dict(pid=CHILD + 2, ppid=ROOT, pgid=ROOT, sid=ROOT, start_time=987800, exit_code=42 << 8,
                     comm="worker")])


def sample_core():
    rlimits = [dict(cur=U64_MAX, max=U64_MAX) for _ in range(16)]
    rlimits[7] = dict(cur=1024, max=20000)          # RLIMIT_NOFILE
    rlimits[3] = dict(cur=8 << 20, max=U64_MAX)     # RLIMIT_STACK
    sigactions = [dict(handler=0, flags=0, restorer=0, mask=0) for _ in range(64)]
    sigactions[10 - 1] = dict(handler=0x55D0C0DE1234, flags=0x04000004, restorer=0x7F3A12200330, mask=1 << 1)
    sigactions[13 - 1] = dict(handler=1, flags=0, restorer=0, mask=0)   # SIGPIPE ignored
    return dict(
        pid=ROOT, comm="counter", personality=0, umask=0o022,
        cwd="/tmp/w\udcffrk dir",                   # a non-UTF-8 byte in a path
        root="/", no_new_privs=True,
        creds=dict(uid=1000, euid=1000, suid=1000, fsuid=1000, gid=100, egid=100, sgid=100, fsgid=100,
                   groups=[100, 27, 4], cap_inh=0, cap_prm=0, cap_eff=0, cap_bnd=0x1FEFFFFFFFF, cap_amb=0),
        rlimits=rlimits, sigactions=sigactions,
        shared_pending=[siginfo(10, code=0, pid=1, uid=0)],
        seccomp_mode="filter",
        seccomp_filters=[bytes.fromhex("20000000040000001500000100000000060000000000ff7f")],
        xcomp_perm=0, job_stopped=False,
        itimers=[dict(value_us=37_500, interval_us=50_000), dict(value_us=0, interval_us=0),
                 dict(value_us=2_000_000, interval_us=0)],
        threads=[
            dict(tid=ROOT, comm="counter", regs=regs(0x7F3A1230D7FA, 0x7FFC8A2B1F30, rax=2**64 - 516, orig_rax=230),
                 xstate=xstate(), sigmask=0, pending=[],
                 rseq=dict(pointer=0x7F3A12345FE0, size=32, signature=0x53053053),
                 clear_tid_address=0, robust_list=0x7F3A12345A20, robust_list_len=24,
                 sigaltstack=dict(sp=0, flags=2, size=0)),
            dict(tid=THREAD2, regs=regs(0x55D0C0DE2000, 0x7F3A11FFEE90), xstate=xstate(), sigmask=1 << 9,
                 pending=[siginfo(12, code=-6, pid=ROOT, uid=1000)],
                 rseq=dict(pointer=0, size=0, signature=0), comm="worker \udcff",
                 clear_tid_address=0x7F3A11FFF990, robust_list=0x7F3A11FFF9A0, robust_list_len=24,
                 sigaltstack=dict(sp=0x7F3A10000000, flags=0, size=65536)),
        ],
    )


def vma(start, end, prot, path="", kind="anon", shared=False, pgoff=0, dev=(0, 0), inode=0,
        vmflags="rd wr mr mw me ac sd", shmem_id=0, pkey=0):
    return dict(start=start, end=end, prot=prot, shared=shared, pgoff=pgoff, dev_major=dev[0],
                dev_minor=dev[1], inode=inode, path=path, kind=kind, vmflags=vmflags, shmem_id=shmem_id,
                pkey=pkey, file_size=0x5000 if kind == "file" else 0,
                file_mtime_ns=1732575600123456789 if kind == "file" else 0)


def sample_mm():
    exe = "/work/tests/workloads/counter"
    return dict(
        pid=ROOT, exe=exe,
        mm=dict(start_code=0x55D0C0DE1000, end_code=0x55D0C0DE2F00, start_data=0x55D0C0DE4D90,
                end_data=0x55D0C0DE5010, start_brk=0x55D0C1F3B000, brk=0x55D0C1F5C000,
                start_stack=0x7FFC8A2B2F60, arg_start=0x7FFC8A2B3F10, arg_end=0x7FFC8A2B3F2E,
                env_start=0x7FFC8A2B3F2E, env_end=0x7FFC8A2B3FE8),
        auxv=struct.pack("<8Q", 33, 0x7FFC8A3F2000, 6, 4096, 25, 0x7FFC8A2B30B9, 0, 0),
        vmas=[
            vma(0x55D0C0DE0000, 0x55D0C0DE1000, 1, exe, "file", dev=(0xFE, 1), inode=393220, vmflags="rd mr mw me sd"),
            vma(0x55D0C0DE1000, 0x55D0C0DE2000, 5, exe, "file", pgoff=0x1000, dev=(0xFE, 1), inode=393220,
                vmflags="rd ex mr mw me sd"),
            vma(0x55D0C1F3B000, 0x55D0C1F5C000, 3, "[heap]", "heap"),
            vma(0x7F3A12000000, 0x7F3A12100000, 3, "/dev/zero (deleted)", "shmem", shared=True,
                dev=(0, 1), inode=2051, vmflags="rd wr sh mr mw me ms sd", shmem_id=2051),
            vma(0x7FFC8A293000, 0x7FFC8A2B4000, 3, "[stack]", "stack", vmflags="rd wr mr mw me gd ac"),
            vma(0x7FFC8A3EE000, 0x7FFC8A3F2000, 1, "[vvar]", "vvar", vmflags="rd mr pf io de dd sd"),
            vma(0x7FFC8A3F2000, 0x7FFC8A3F4000, 5, "[vdso]", "vdso", vmflags="rd ex mr mw me de sd"),
        ],
    )


def sample_pagemap():
    return dict(owner=str(ROOT), entries=[
        PageRun(0x55D0C0DE4000, 2, False),
        PageRun(0x55D0C1F3B000, 33, True),
        PageRun(0x7FFC8A2B0000, 4, False),
    ])


def sample_files():
    return dict(processes=[
        dict(pid=ROOT, fds=[
            dict(fd=0, type="chr", flags=0o100002, pos=0, cloexec=False, path="/dev/null", deleted=False,
                 pipe_id=0, rdev=os.makedev(1, 3), size=0, file_id=7),
            dict(fd=3, type="reg", flags=0o102001, pos=4096, cloexec=True, path="/tmp/log\udce9.txt",
                 deleted=True, pipe_id=0, rdev=0, size=8192, file_id=7),
            dict(fd=4, type="pipe", flags=0o0, pos=0, cloexec=False, path="pipe:[51234]", deleted=False,
                 pipe_id=51234, rdev=0, size=0, file_id=7),
        ]),
        dict(pid=CHILD, fds=[
            dict(fd=1, type="pipe", flags=0o1, pos=0, cloexec=False, path="pipe:[51234]", deleted=False,
                 pipe_id=51234, rdev=0, size=0, file_id=7),
            dict(fd=7, type="unsupported", flags=0o2, pos=0, cloexec=True, path="socket:[777]", deleted=False,
                 pipe_id=0, rdev=0, size=0, file_id=7),
        ]),
    ])


def sample_pipes_data():
    return dict(pipes=[dict(pipe_id=51234, data=b"hello\x00\xffworld\n" * 3, size=65536),
                       dict(pipe_id=51240, data=b"", size=1 << 20)])


def sample_tracker():
    return dict(pid=ROOT, tracker="uffd-wp", start_time=987654, uffd_fd=1017,
                registered=struct.pack("<4Q", 0x55D0C1F3B000, 0x21000, 0x7F3A12000000, 1 << 28),
                hash_runs=b"", hashes=b"")


def sample_manifest():
    return dict(set_id=bytes(range(16)), parent_set_id=bytes(16), chunk_size=1 << 20,
                files=[dict(name="inventory.img", size=120, digest=b"\x5a" * 16, sums=b""),
                       dict(name=f"pages-{ROOT}.img", size=6 * 4096, digest=b"",
                            sums=struct.pack("<I", 0xE3069283))],
                digest=b"\x01" * 16)


def sample_unixsk():
    base = dict(dir="", deleted=False, mode=0, uid=0, gid=0, peer=0, peer_gone=False, accepted_from=0, ext_peer=b"",
                backlog=0, pending=[], shutdown=0, passcred=False, passsec=False, rcvbuf=212992, sndbuf=212992,
                rcvlowat=1, rcvtimeo=0, sndtimeo=0, peek_off=-1, queue=[])
    return dict(sockets=[
        dict(base, file_id=3, ino=100, type="stream", state="listen", name=b"/run/x.sock", mode=0o640, uid=7,
             gid=8, backlog=4, pending=[102]),
        dict(base, file_id=4, ino=101, type="stream", state="established", name=b"", accepted_from=100, peer=103,
             queue=[dict(sender=103, data=b"req")]),
        dict(base, file_id=5, ino=102, type="stream", state="established", name=b""),
        dict(base, file_id=6, ino=103, type="stream", state="established", name=b"", peer=101, shutdown=2),
        dict(base, file_id=7, ino=104, type="dgram", state="close", name=b"\0abstract", passcred=True,
             rcvtimeo=1500000, peek_off=3, queue=[dict(sender=0, data=b""), dict(sender=105, data=b"hi")]),
        dict(base, file_id=8, ino=105, type="seqpacket", state="established", name=b"", ext_peer=b"/run/s"),
    ])


def sample_eventfd():
    return dict(eventfds=[dict(file_id=4, count=7, semaphore=False), dict(file_id=9, count=2**64 - 2, semaphore=True)])


def sample_eventpoll():
    return dict(eventpolls=[dict(file_id=3, idle=True, targets=[
        dict(pid=ROOT, tfd=5, events=0x80000019, data=2**64 - 1), dict(pid=ROOT, tfd=6, events=0x40000000, data=6)])])


def sample_signalfd():
    return dict(signalfds=[dict(file_id=5, sigmask=1 << 11)])


def sample_timerfd():
    return dict(timerfds=[dict(file_id=6, clockid=1, settime_flags=0, ticks=3, value_ns=5_000_000,
                               interval_ns=10_000_000, expires_ns=123_456_789_000)])


def sample_inotify():
    return dict(inotifies=[dict(file_id=7, watches=[dict(wd=1, mask=0x300, dev=0xFE00, ino=42, path="/tmp"),
                                                    dict(wd=9, mask=0x80000100, dev=0xFE00, ino=43, path="/tmp/\udcff")])])


def sample_memfd():
    return dict(memfds=[dict(shmem_id=12708, name="pycr-test", size=12388, seals=0x0E, mode=0o777, file_ids=[3, 5]),
                        dict(shmem_id=12710, name="mapped-only", size=8192, seals=1, mode=0o600, file_ids=[])])


def sample_ghost():
    return dict(ghosts=[dict(ghost_id=1, dev_major=259, dev_minor=1, inode=123456, path="/tmp/w/ghost.log",
                             mode=0o640, uid=1000, gid=1000, size=8899, mtime_ns=1_700_000_000_123_456_789,
                             file_ids=[4])])


def sample_sysvshm():
    return dict(segments=[dict(shmid=32769, key=0x7C001230, mode=0o640, size=12388, uid=0, gid=0, cuid=0, cgid=0),
                          dict(shmid=5, key=0, mode=0o1600, size=8192, uid=1000, gid=1000, cuid=1000, cgid=1000)])
def sample_inetsk():
    addr = dict(addr=b"\x7f\x00\x00\x01", port=8000, scope_id=0)
    peer = dict(addr=b"\x7f\x00\x00\x01", port=43210, scope_id=0)
    none6 = dict(addr=bytes(16), port=0, scope_id=0)
    tcp = dict(inq_seq=2**32 - 3, outq_seq=12345, recv_data=b"GET /", send_data=b"HTTP/1.1 200", unsent=4,
               mss_clamp=65483, options=7, snd_wscale=7, rcv_wscale=7, timestamp=99, snd_wl1=1, snd_wnd=2,
               max_window=3, rcv_wnd=4, rcv_wup=5)
    return dict(sockets=[
        dict(file_id=3, inode=667053, family=10, type=1, protocol=6, state=10, handover=False,
             local=dict(addr=b"\x00" * 15 + b"\x01", port=8000, scope_id=0), peer=none6, backlog=128,
             options=[dict(level=41, name=26, value=b"\x01\x00\x00\x00")], tcp=[]),
        dict(file_id=5, inode=667054, family=2, type=1, protocol=6, state=1, handover=False,
             local=addr, peer=peer, backlog=0, options=[], tcp=[tcp]),
        dict(file_id=6, inode=667055, family=2, type=2, protocol=17, state=7, handover=True,
             local=addr, peer=dict(addr=bytes(4), port=0, scope_id=0), backlog=0, options=[], tcp=[])])


def sample_timers():
    return dict(processes=[dict(pid=ROOT, timers=[
        dict(id=0, clock=1, notify=0, signo=10, sigval=0x7F3A12345000, tid=0, value_ns=12_345_678,
             interval_ns=20_000_000, overrun=3),
        dict(id=7, clock=-6, notify=4, signo=12, sigval=5, tid=THREAD2, value_ns=0, interval_ns=0, overrun=0),
        dict(id=2**31 - 1, clock=0, notify=1, signo=0, sigval=0, tid=0, value_ns=2**40, interval_ns=0, overrun=0),
    ])])


def sample_file_locks():
    return dict(locks=[
        dict(kind="posix", write=True, pid=ROOT, fd=3, file_id=7, start=100, length=50),
        dict(kind="flock", write=False, pid=CHILD, fd=4, file_id=9, start=0, length=0),
        dict(kind="ofd", write=True, pid=ROOT, fd=5, file_id=11, start=2**62, length=0),
    ])
def sample_tty():
    termios = dict(iflag=0x500, oflag=5, cflag=0xBF, lflag=0x8A3B, line=0, cc=bytes(range(19)),
                   ispeed=38400, ospeed=38400)
    pty = dict(index=3, inherited=False, termios=termios, winsize=dict(rows=40, cols=132, xpixel=0, ypixel=0),
               packet=True, locked=False, exclusive=True, other_closed=False, sid=100, pgrp=104)
    job = dict(pty, index=0, inherited=True, packet=False, exclusive=False, sid=0, pgrp=0)
    return dict(ptys=[job, pty], files=[dict(file_id=2, index=3, master=True), dict(file_id=5, index=3, master=False),
                                        dict(file_id=1, index=0, master=False)])


SAMPLES = {
    "inventory": sample_inventory,
    "pstree": sample_pstree,
    "core": sample_core,
    "mm": sample_mm,
    "pagemap": sample_pagemap,
    "files": sample_files,
    "pipes-data": sample_pipes_data,
    "tracker": sample_tracker,
    "manifest": sample_manifest,
    "eventfd": sample_eventfd,
    "eventpoll": sample_eventpoll,
    "signalfd": sample_signalfd,
    "timerfd": sample_timerfd,
    "inotify": sample_inotify,
    "memfd": sample_memfd,
    "ghost": sample_ghost,
    "sysvshm": sample_sysvshm,
    "unixsk": sample_unixsk,
    "inetsk": sample_inetsk,
    "timers": sample_timers,
    "file-locks": sample_file_locks,
    "tty": sample_tty,
}


def only_plain_json(value):
    """True if value holds nothing but what json.loads can produce."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and only_plain_json(v) for k, v in value.items())
    if isinstance(value, list):
        return all(map(only_plain_json, value))
    return value is None or type(value) in (str, int, float, bool)


# ---------------------------------------------------------------- round trips

def test_registry_covers_every_kind_with_distinct_magic():
    with_schema = {name for name, k in KINDS.items() if k.schema is not None}
    assert with_schema == set(SAMPLES)
    magics = [KINDS[name].magic for name in with_schema]
    assert len(set(magics)) == len(magics)
    for name in with_schema:
        assert kind_of_magic(KINDS[name].magic) == name
    assert kind_of_magic(b"\x7fELF") is None
    assert KINDS["pages"].magic is None


def test_kind_of_file_reads_the_magic(tmp_path):
    directory = images.ImageDir(tmp_path)
    path = directory.write("mm", sample_mm())
    assert kind_of_file(path) == "mm"
    assert kind_of_file("/bin/true") is None
    assert images.classify_name("pages-shmem-7.img") == images.ImageFile("pages", "shmem-7", "pages-shmem-7.img")
    assert images.classify_name("pagemap-12.img").key == 12
    assert images.classify_name(".core-1.img.x1.tmp") is None


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_round_trip_through_bytes_and_json(kind):
    data = images.build(kind, SAMPLES[kind]())
    assert data[:4] == KINDS[kind].magic
    assert struct.unpack("<I", data[4:8])[0] == FORMAT_VERSION

    parsed = images.parse(data)
    assert parsed._kind == kind
    assert images.build(kind, parsed) == data

    text = images.to_json(parsed)
    doc = json.loads(text)
    assert doc["kind"] == kind and doc["version"] == FORMAT_VERSION
    assert only_plain_json(doc)
    assert "_io" not in text

    again = images.from_json(text)
    assert images.build(kind, again) == data
    assert images.to_json(again) == text


def test_parsed_values_match_what_was_built():
    core = images.parse(images.build("core", sample_core()))
    assert core.comm == "counter"
    assert core.cwd == "/tmp/w\udcffrk dir"
    assert core.cwd.encode("utf-8", "surrogateescape") == b"/tmp/w\xffrk dir"
    assert core.threads[0].regs.rip == 0x7F3A1230D7FA
    assert core.threads[0].regs.rax == 2**64 - 516
    assert core.threads[0].xstate == xstate()
    assert core.threads[1].pending[0] == siginfo(12, code=-6, pid=ROOT, uid=1000)
    assert core.seccomp_mode == "filter"
    assert core.rlimits[7].max == 20000
    assert core.sigactions[9].handler == 0x55D0C0DE1234

    mm = images.parse(images.build("mm", sample_mm()))
    assert [v.kind for v in mm.vmas][:3] == ["file", "file", "heap"]
    assert mm.vmas[3].shared is True and mm.vmas[3].shmem_id == 2051

    inventory = images.parse(images.build("inventory", sample_inventory()))
    assert inventory.kind == "pre-dump" and inventory.parent == "../pass-0"


def test_json_blobs_are_hex_and_building_accepts_hex():
    doc = json.loads(images.to_json(images.parse(images.build("pipes-data", sample_pipes_data()))))
    assert doc["body"]["pipes"][0]["data"] == (b"hello\x00\xffworld\n" * 3).hex()
    from_hex = dict(pipes=[dict(pipe_id=1, data="00ff10", size=65536)])
    assert images.parse(images.build("pipes-data", from_hex)).pipes[0].data == b"\x00\xff\x10"


def test_json_keeps_non_utf8_path_bytes():
    text = images.to_json(images.parse(images.build("files", sample_files())))
    assert "\\udce9" in text
    files = images.from_json(text)
    assert files.processes[0].fds[1].path.encode("utf-8", "surrogateescape") == b"/tmp/log\xe9.txt"


def test_pagemap_entries_accept_tuples_and_dicts():
    as_dicts = dict(owner="shmem-2051", entries=[dict(vaddr=0, nr_pages=3, in_parent=False),
                                                 dict(vaddr=0x5000, nr_pages=1, in_parent=True)])
    as_tuples = dict(owner="shmem-2051", entries=[(0, 3, False), (0x5000, 1, True)])
    assert images.build("pagemap", as_dicts) == images.build("pagemap", as_tuples)
    parsed = images.parse(images.build("pagemap", as_dicts))
    assert parsed.entries == [PageRun(0, 3, False), PageRun(0x5000, 1, True)]


def test_iter_page_runs_accumulates_offsets_past_parent_runs():
    runs = list(images.iter_page_runs(images.parse(images.build("pagemap", sample_pagemap()))))
    assert runs == [
        (0x55D0C0DE4000, 2, False, 0),
        (0x55D0C1F3B000, 33, True, None),
        (0x7FFC8A2B0000, 4, False, 2 * 4096),
    ]


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_truncated_image_names_kind_and_cause(kind, tmp_path):
    data = images.build(kind, SAMPLES[kind]())
    for cut in (HEADER_SIZE + 2, len(data) // 2, len(data) - 1):
        path = tmp_path / f"cut-{cut}.img"
        path.write_bytes(data[:cut])
        with pytest.raises(ImageError, match=f"truncated {kind} image") as info:
            images.load(path)
        assert str(path) in str(info.value)
    path = tmp_path / "header.img"
    path.write_bytes(data[:5])
    with pytest.raises(ImageError, match="shorter than the 8-byte image header"):
        images.load(path)


def test_flipped_magic_is_not_a_pycr_image(tmp_path):
    data = bytearray(images.build("core", sample_core()))
    data[0] ^= 0xFF
    path = tmp_path / "core-1.img"
    path.write_bytes(data)
    with pytest.raises(ImageError, match=r"not a pycr image \(magic"):
        images.load(path)


def test_foreign_file_is_not_a_pycr_image(tmp_path):
    with open("/bin/true", "rb") as f:
        head = f.read(256)
    path = tmp_path / "inventory.img"
    path.write_bytes(head)
    with pytest.raises(ImageError, match=r"not a pycr image \(magic b'\\x7fELF'\)"):
        images.ImageDir(tmp_path).read("inventory")


def test_image_of_another_kind_is_named(tmp_path):
    directory = images.ImageDir(tmp_path)
    directory.write("pstree", sample_pstree())
    os.rename(directory.path_of("pstree"), directory.path_of("core", ROOT))
    with pytest.raises(ImageError, match="a pstree image where a core image was expected"):
        directory.read("core", ROOT)


def test_newer_version_is_refused(tmp_path):
    data = bytearray(images.build("inventory", sample_inventory()))
    data[4:8] = struct.pack("<I", FORMAT_VERSION + 1)
    path = tmp_path / "inventory.img"
    path.write_bytes(data)
    with pytest.raises(ImageError, match=f"format version {FORMAT_VERSION + 1} is newer than this pycr reads "
                                         rf"\({FORMAT_VERSION}\)"):
        images.load(path)
    doc = json.loads(images.to_json(images.parse(images.build("inventory", sample_inventory()))))
    doc["version"] = FORMAT_VERSION + 1
    with pytest.raises(ImageError, match="is newer than this pycr reads"):
        images.from_json(json.dumps(doc))


def test_trailing_garbage_and_bad_flags_are_corrupt():
    data = images.build("pstree", sample_pstree())
    with pytest.raises(ImageError, match="corrupt pstree image: 3 unexpected bytes"):
        images.parse(data + b"xyz")
    pagemap = bytearray(images.build("pagemap", dict(owner="1", entries=[(0x1000, 1, False)])))
    pagemap[-4:] = struct.pack("<I", 0x80)
    with pytest.raises(ImageError, match="corrupt pagemap image.*unknown flags 0x80"):
        images.parse(bytes(pagemap))


def test_bad_objects_and_bad_json_raise_image_error():
    core = sample_core()
    core["rlimits"] = core["rlimits"][:15] + [dict(cur=1, max="x")]
    with pytest.raises(ImageError, match="cannot build a core image: field rlimits"):
        images.build("core", core)
    inventory = sample_inventory()
    del inventory["tracker"]
    with pytest.raises(ImageError, match="missing field 'tracker'"):
        images.build("inventory", inventory)
    with pytest.raises(ImageError, match="not valid JSON"):
        images.from_json("{nope")
    with pytest.raises(ImageError, match="unknown image kind 'bogus'"):
        images.from_json('{"kind": "bogus", "version": 1, "body": {}}')
    with pytest.raises(ImageError, match="bad inventory image: field kind"):
        images.from_json(json.dumps({"kind": "inventory", "version": 1, "body": dict(sample_inventory(), kind="x")}))


def test_missing_image_is_named(tmp_path):
    with pytest.raises(ImageError, match="missing") as info:
        images.ImageDir(tmp_path).read("mm", 99)
    assert "mm-99.img" in str(info.value)


# ---------------------------------------------------------------- image directories

def test_write_is_0600_in_a_0700_dir_and_reads_back(tmp_path):
    directory = images.ImageDir(tmp_path / "dump")
    path = directory.write("core", sample_core())
    assert os.path.basename(path) == f"core-{ROOT}.img"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(directory.path).st_mode) == 0o700
    assert directory.exists("core", ROOT) and not directory.exists("core", CHILD)
    assert directory.read("core", ROOT).threads[1].tid == THREAD2
    assert os.listdir(directory.path) == [f"core-{ROOT}.img"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    directory = images.ImageDir(tmp_path)
    directory.write("inventory", sample_inventory())
    before = open(directory.path_of("inventory"), "rb").read()
    broken = sample_inventory()
    broken["page_size"] = "big"
    with pytest.raises(ImageError):
        directory.write("inventory", broken)
    assert os.listdir(tmp_path) == ["inventory.img"]
    assert open(directory.path_of("inventory"), "rb").read() == before


def test_pages_writer_is_atomic(tmp_path):
    directory = images.ImageDir(tmp_path)
    with pytest.raises(RuntimeError):
        with directory.pages_writer(ROOT) as f:
            f.write(b"\x01" * 4096)
            raise RuntimeError("reader failed")
    assert os.listdir(tmp_path) == []

    with directory.pages_writer(ROOT) as f:
        f.write_fd(b"\x02" * 8192)     # to the fd, as the native core does, and summed
    assert os.listdir(tmp_path) == [f"pages-{ROOT}.img"]
    assert directory.written[f"pages-{ROOT}.img"].sums == struct.pack("<I", core.crc32c(b"\x02" * 8192))
    assert open(directory.pages_path(ROOT), "rb").read() == b"\x02" * 8192
    assert stat.S_IMODE(os.stat(directory.pages_path(ROOT)).st_mode) == 0o600


def test_dump_and_load_module_level(tmp_path):
    path = tmp_path / "x" / "mm.img"
    os.makedirs(path.parent)
    mm = images.from_json(images.to_json(images.parse(images.build("mm", sample_mm()))))
    images.dump(mm, path)
    assert images.load(path, "mm") == images.parse(images.build("mm", sample_mm()))
    with pytest.raises(ValueError, match="kind unknown"):
        images.dump(sample_mm(), path)


def test_list_sorts_globals_then_per_pid_then_shmem(tmp_path):
    directory = images.ImageDir(tmp_path)
    for pid in (CHILD, ROOT):
        directory.write("mm", dict(sample_mm(), pid=pid))
        directory.write("core", dict(sample_core(), pid=pid))
        directory.write("pagemap", dict(sample_pagemap(), owner=str(pid)))
        with directory.pages_writer(pid) as f:
            f.write(bytes(4096))
    directory.write("pagemap", dict(owner="shmem-2051", entries=[(0, 1, False)]))
    for kind in ("pipes-data", "files", "pstree", "inventory"):
        directory.write(kind, SAMPLES[kind]())
    (tmp_path / "notes.txt").write_text("not an image")
    names = [image.name for image in directory.list()]
    assert names == [
        "inventory.img", "pstree.img", "files.img", "pipes-data.img",
        f"core-{ROOT}.img", f"mm-{ROOT}.img", f"pagemap-{ROOT}.img", f"pages-{ROOT}.img",
        f"core-{CHILD}.img", f"mm-{CHILD}.img", f"pagemap-{CHILD}.img", f"pages-{CHILD}.img",
        "pagemap-shmem-2051.img",
    ]
    assert directory.list()[-1].key == "shmem-2051"
    assert directory.list()[4].key == ROOT


def test_parent_follows_the_inventory_link(tmp_path):
    first = images.ImageDir(tmp_path / "pass-0")
    first.write("inventory", dict(sample_inventory(), parent="", kind="pre-dump", pass_nr=0))
    second = images.ImageDir(tmp_path / "pass-1")
    second.write("inventory", sample_inventory())
    assert second.parent().path == first.path
    assert first.parent() is None


def test_compiled_schemas_parse_as_the_declared_ones_and_refuse_alike(monkeypatch):
    """pycr serve parses with schemas construct compiled (images.compile_schemas): every sample
    reads the same, and a truncated image or one with bytes after its end gets the same error."""
    monkeypatch.setattr(images, "_compiled", {})
    declared, compiled = {}, {}
    for kind, make in SAMPLES.items():
        data = images.build(kind, make())
        variants = [data, data[:-3], data + b"xx"]
        declared[kind] = [_outcome(kind, d) for d in variants]
        images.compile_schemas([kind])
        assert kind in images._compiled
        compiled[kind] = [_outcome(kind, d) for d in variants]
    assert compiled == declared
    assert all(result[0].startswith("{") for result in declared.values())


def _outcome(kind, data):
    try:
        return images.to_json(images.parse(data, kind))
    except ImageError as exc:
        return str(exc)
