"""pycr show: print the images of a dump directory, or one image file.

Text mode is meant for eyes (registers in hex, VMAs like /proc/PID/maps, blobs
abridged); --json prints every field exactly (blobs in hex) for tools.
"""

import json as _json
import os
import signal
import sys

from . import images
from .abi import RLIM_INFINITY
from .errors import ImageError
from .formats import HEADER_SIZE, kind_of_magic
from .formats.common import REGISTER_NAMES
from .formats.mm import PROT_EXEC, PROT_READ, PROT_WRITE

PREVIEW_BYTES = 16

RLIMIT_NAMES = (
    "CPU", "FSIZE", "DATA", "STACK", "CORE", "RSS", "NPROC", "NOFILE",
    "MEMLOCK", "AS", "LOCKS", "SIGPENDING", "MSGQUEUE", "NICE", "RTPRIO", "RTTIME",
)


def show(path, json=False, out=sys.stdout):
    """Print a dump directory (every image, in order) or a single image file.

    Raises ImageError if the path is missing or an image is unreadable; in a
    directory the other images are printed first.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        _show_dir(path, json, out)
    elif os.path.exists(path):
        entry = _load_entry(path)
        if json:
            out.write(_json.dumps(entry, indent=2) + "\n")
        else:
            out.write(_render(os.path.basename(path), entry))
    else:
        raise ImageError(path, "no such file or directory")


def _show_dir(path, json, out):
    image_dir = images.ImageDir(path)
    first_error = None
    documents = {}
    found = image_dir.list()
    if not found:
        raise ImageError(path, "no pycr images in this directory")
    for image in found:
        file_path = os.path.join(path, image.name)
        try:
            entry = _load_entry(file_path, image.kind)
        except ImageError as exc:
            first_error = first_error or exc
            entry = {"kind": image.kind, "error": str(exc)}
        if json:
            documents[image.name] = entry
        else:
            out.write(_render(image.name, entry))
    if json:
        out.write(_json.dumps(documents, indent=2) + "\n")
    if first_error is not None:
        raise first_error


def _load_entry(path, kind=None):
    """The JSON-able description of one file: an image, or a raw pages file."""
    if kind is None:
        kind = _kind_of_file(path)
    if kind == "pages":
        try:
            size = os.path.getsize(path)
        except OSError as exc:
            raise ImageError(path, f"cannot read: {exc.strerror}") from None
        return {"kind": "pages", "size": size}
    obj = images.load(path, kind)
    return {"kind": obj._kind, "version": obj._version, "body": images.to_plain(obj)}


def _kind_of_file(path):
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_SIZE)
    except OSError as exc:
        raise ImageError(path, f"cannot read: {exc.strerror}") from None
    kind = kind_of_magic(head)
    if kind is None:
        named = images.classify_name(os.path.basename(path))
        if named is not None and named.kind == "pages":
            return "pages"
    return kind  # None: load() names the foreign magic


# ---------------------------------------------------------------- text rendering

def _render(name, entry):
    if "error" in entry:
        return f"== {name}\n  error: {entry['error']}\n\n"
    kind = entry["kind"]
    if kind == "pages":
        size = entry["size"]
        return f"== {name} (raw pages)\n  {size} bytes, {size // images.PAGE_SIZE} pages\n\n"
    renderer = _RENDERERS.get(kind, _render_generic)
    lines = [f"== {name} ({kind}, format {entry['version']})"]
    lines += ["  " + line for line in renderer(entry["body"])]
    return "\n".join(lines) + "\n\n"


def _blob(hex_text):
    """'832 bytes: 7f 03 00 ...' for a blob given as hex."""
    data = bytes.fromhex(hex_text)
    head = data[:PREVIEW_BYTES].hex(" ")
    more = " ..." if len(data) > PREVIEW_BYTES else ""
    return f"{len(data)} bytes" + (f": {head}{more}" if data else "")


def _render_generic(body, indent=""):
    lines = []
    for key, value in body.items():
        if isinstance(value, dict):
            lines.append(f"{indent}{key}:")
            lines += _render_generic(value, indent + "  ")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f"{indent}{key}: {len(value)}")
            for item in value:
                lines.append(f"{indent}  -")
                lines += _render_generic(item, indent + "    ")
        else:
            lines.append(f"{indent}{key}: {_scalar(value)}")
    return lines


def _scalar(value):
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list):
        return ", ".join(map(str, value)) if value else "-"
    return str(value)


def _render_inventory(body):
    lines = [f"{key:<16}{_scalar(value)}" for key, value in body.items() if key != "cpu"]
    cpu = body.get("cpu")
    if cpu is not None:
        from .ptrace.xstate import component_names
        lines.append(f"{'cpu':<16}{cpu['vendor']} {cpu['model']}".rstrip())
        lines.append(f"{'xstate':<16}{cpu['xstate_size']} bytes, XCR0 {cpu['xcr0']:#x} "
                     f"({component_names(cpu['xcr0'])})")
        lines.extend(f"{'':<16}component {c['index']:>2} at {c['offset']:>5}, {c['size']:>5} bytes"
                     for c in cpu["xstate_components"])
    return lines


def _render_pstree(body):
    lines = [f"{'PID':>7} {'PPID':>7} {'PGID':>7} {'SID':>7} {'START':>12}  THREADS"]
    for p in body["processes"]:
        threads = ",".join(map(str, p["threads"]))
        notes = ""
        if p.get("leader_exited"):
            notes += f"  (leader exited, status {p['leader_exit_code']:#x})"
        if p.get("shares_files"):
            notes += "  (fd table shared with its parent)"
        lines.append(f"{p['pid']:>7} {p['ppid']:>7} {p['pgid']:>7} {p['sid']:>7} {p['start_time']:>12}  "
                     f"{threads}{notes}")
    for z in body.get("zombies", []):
        lines.append(f"{z['pid']:>7} {z['ppid']:>7} {z['pgid']:>7} {z['sid']:>7} {z['start_time']:>12}  "
                     f"zombie, {_wait_status(z['exit_code'])}")
    return lines


def _wait_status(status):
    """A wait status as words: "exit 42", "killed by SIGTERM (core dumped)"."""
    if status & 0x7F == 0:
        return f"exit {status >> 8 & 0xFF}"
    return f"killed by {_signal_name(status & 0x7F)}" + (" (core dumped)" if status & 0x80 else "")


def _signal_name(signo):
    try:
        return signal.Signals(signo).name
    except ValueError:
        rtmin = signal.SIGRTMIN.value
        return f"SIGRTMIN+{signo - rtmin}" if signo > rtmin else f"SIG{signo}"


def _siginfo(hex_text):
    data = bytes.fromhex(hex_text)
    signo = int.from_bytes(data[:4], "little", signed=True)
    code = int.from_bytes(data[8:12], "little", signed=True)
    return f"{_signal_name(signo) if signo > 0 else signo} code={code}"


def _render_core(body):
    creds = body["creds"]
    lines = [
        f"pid {body['pid']}  comm {body['comm']!r}  personality {body['personality']:#x}  "
        f"umask {body['umask']:04o}  no_new_privs {int(body['no_new_privs'])}",
        f"cwd {body['cwd']!r}  root {body['root']!r}",
        "uid {uid}/{euid}/{suid}/{fsuid}  gid {gid}/{egid}/{sgid}/{fsgid}  groups {groups}".format(
            **dict(creds, groups=_scalar(creds["groups"]))),
        "caps inh {:#x} prm {:#x} eff {:#x} bnd {:#x} amb {:#x}".format(
            creds["cap_inh"], creds["cap_prm"], creds["cap_eff"], creds["cap_bnd"], creds["cap_amb"]),
        "rlimits:",
    ]
    limit = lambda v: "unlimited" if v == RLIM_INFINITY else str(v)
    for i, rl in enumerate(body["rlimits"]):
        name = RLIMIT_NAMES[i] if i < len(RLIMIT_NAMES) else str(i)
        lines.append(f"  {name:<11} {limit(rl['cur'])} / {limit(rl['max'])}")
    handled = [(i + 1, sa) for i, sa in enumerate(body["sigactions"]) if any(sa.values())]
    lines.append(f"sigactions: {len(handled)} not default")
    for signo, sa in handled:
        handler = {0: "SIG_DFL", 1: "SIG_IGN"}.get(sa["handler"], f"{sa['handler']:#x}")
        lines.append(f"  {_signal_name(signo):<12} {handler} flags {sa['flags']:#x} "
                     f"restorer {sa['restorer']:#x} mask {sa['mask']:#x}")
    lines.append(f"shared pending: {len(body['shared_pending'])}")
    lines += [f"  {_siginfo(si)}" for si in body["shared_pending"]]
    lines.append(f"seccomp {body['seccomp_mode']}, {len(body['seccomp_filters'])} filters")
    lines += [f"  filter {i}: {_blob(f)}" for i, f in enumerate(body["seccomp_filters"])]
    for thread in body["threads"]:
        rseq = thread["rseq"]
        lines.append(f"thread {thread['tid']}: sigmask {thread['sigmask']:#x}  "
                     f"rseq {rseq['pointer']:#x} size {rseq['size']} sig {rseq['signature']:#x}")
        regs = thread["regs"]
        for row in range(0, len(REGISTER_NAMES), 4):
            names = REGISTER_NAMES[row:row + 4]
            lines.append("  " + "  ".join(f"{n:>8} {regs[n]:016x}" for n in names))
        lines.append(f"  xstate {_blob(thread['xstate'])}")
        lines.append(f"  pending: {len(thread['pending'])}")
        lines += [f"    {_siginfo(si)}" for si in thread["pending"]]
    return lines


def _prot(vma):
    prot = vma["prot"]
    return ("r" if prot & PROT_READ else "-") + ("w" if prot & PROT_WRITE else "-") + \
        ("x" if prot & PROT_EXEC else "-") + ("s" if vma["shared"] else "p")


def _render_mm(body):
    mm = body["mm"]
    lines = [f"pid {body['pid']}  exe {body['exe']!r}"]
    names = list(mm)
    for row in range(0, len(names), 4):
        lines.append("  ".join(f"{n} {mm[n]:#x}" for n in names[row:row + 4]))
    lines.append(f"auxv {_blob(body['auxv'])}")
    lines.append(f"vmas: {len(body['vmas'])}")
    for v in body["vmas"]:
        extra = f"  shmem {v['shmem_id']}" if v["kind"] == "shmem" else ""
        lines.append(f"  {v['start']:08x}-{v['end']:08x} {_prot(v)} {v['pgoff']:08x} "
                     f"{v['dev_major']:02x}:{v['dev_minor']:02x} {v['inode']:<8} {v['path']:<24} "
                     f"[{v['kind']}] {v['vmflags']}{extra}")
    return lines


def _render_pagemap(body):
    entries = body["entries"]
    total = sum(e["nr_pages"] for e in entries)
    lines = [f"owner {body['owner']}  runs {len(entries)}  pages {total}"]
    for vaddr, nr_pages, in_parent, offset in images.iter_page_runs(entries):
        end = vaddr + nr_pages * images.PAGE_SIZE
        where = "in parent" if in_parent else f"at {offset:#x} in pages file"
        lines.append(f"  {vaddr:08x}-{end:08x} {nr_pages:>6} pages  {where}")
    return lines


def _render_files(body):
    lines = []
    for proc in body["processes"]:
        lines.append(f"pid {proc['pid']}: {len(proc['fds'])} fds")
        for fd in proc["fds"]:
            extra = []
            if fd["deleted"]:
                extra.append("(deleted)")
            if fd["pipe_id"]:
                extra.append(f"pipe {fd['pipe_id']}")
            if fd["rdev"]:
                extra.append(f"rdev {os.major(fd['rdev'])}:{os.minor(fd['rdev'])}")
            if fd["type"] == "reg":
                extra.append(f"size {fd['size']}")
            extra.append(f"file #{fd['file_id']}")
            lines.append(f"  {fd['fd']:>4} {fd['type']:<11} flags {fd['flags']:#o} pos {fd['pos']}"
                         f"{' cloexec' if fd['cloexec'] else ''}  {fd['path']!r} {' '.join(extra)}".rstrip())
    return lines


def _render_pipes_data(body):
    lines = [f"pipes: {len(body['pipes'])}"]
    lines += [f"  pipe {p['pipe_id']} size {p['size']}: {_blob(p['data'])}" for p in body["pipes"]]
    return lines


def _render_manifest(body):
    parent = body["parent_set_id"]
    lines = [f"set {body['set_id']}  parent {parent if parent.strip('0') else '-'}  "
             f"pages checksum: CRC-32C per {body['chunk_size']} bytes",
             f"files: {len(body['files'])}"]
    for f in body["files"]:
        check = (f"blake2b-128 {f['digest']}" if f["digest"]
                 else f"{len(f['sums']) // 8} CRC-32C sums")
        lines.append(f"  {f['name']:<24} {f['size']:>12} bytes  {check}")
    lines.append(f"digest {body['digest']}")
    return lines


_RENDERERS = {
    "manifest": _render_manifest,
    "inventory": _render_inventory,
    "pstree": _render_pstree,
    "core": _render_core,
    "mm": _render_mm,
    "pagemap": _render_pagemap,
    "files": _render_files,
    "pipes-data": _render_pipes_data,
}
