"""/proc/PID/maps: the VMAs of a process, classified by what backs them.

kind is one of anon, file, heap, stack, vdso, vvar, vvar_vclock, vsyscall,
shmem, special. A shared anonymous mapping shows as "/dev/zero (deleted)", or
"[anon_shmem:NAME]" once named (PR_SET_VMA_ANON_NAME, Linux 6.2+), and SysV
shm as "/SYSV<key> (deleted)"; these, and shared memfd mappings, are kind
shmem. "[anon:NAME]" is named private anonymous memory (kind anon). Any other
"[...]" is a mapping the kernel made for its own ends (kind special: [uprobes]
or one pycr does not know); a file's path always starts with "/".
"""

from dataclasses import dataclass

from pycr.proc._read import read_text

_SPECIAL = {"[heap]": "heap", "[stack]": "stack", "[vdso]": "vdso", "[vvar]": "vvar",
            "[vvar_vclock]": "vvar_vclock", "[vsyscall]": "vsyscall"}
_DELETED = " (deleted)"


@dataclass
class Vma:
    start: int
    end: int
    read: bool
    write: bool
    exec: bool
    shared: bool
    offset: int
    dev_major: int
    dev_minor: int
    inode: int
    path: str          # without the " (deleted)" suffix
    deleted: bool
    kind: str

    @property
    def size(self):
        return self.end - self.start

    @property
    def perms(self):
        return ("r" if self.read else "-") + ("w" if self.write else "-") + \
               ("x" if self.exec else "-") + ("s" if self.shared else "p")

    @property
    def is_memfd(self):
        return self.path.startswith("/memfd:")

    @property
    def is_sysv(self):
        return self.path.startswith("/SYSV")

    @property
    def anon_name(self):
        """The name given with PR_SET_VMA_ANON_NAME ("[anon:NAME]", "[anon_shmem:NAME]"), or None."""
        for prefix in ("[anon:", "[anon_shmem:"):
            if self.path.startswith(prefix) and self.path.endswith("]"):
                return self.path[len(prefix):-1]
        return None


def _kind(path, deleted, shared, inode):
    if path in _SPECIAL:
        return _SPECIAL[path]
    if path.startswith("[stack:"):
        return "stack"
    if path.startswith("[anon_shmem:"):
        return "shmem" if shared else "special"
    if not path or path.startswith("[anon:"):  # "[anon:name]" from PR_SET_VMA_ANON_NAME
        return "anon"
    if path.startswith("["):
        return "special"
    if shared and deleted and (path == "/dev/zero" or path.startswith("/SYSV")
                               or path.startswith("/memfd:")):
        return "shmem"
    return "file"


def parse_line(line):
    """Parse one maps line (also the header line of each smaps entry)."""
    parts = line.split(None, 5)
    start, _, end = parts[0].partition("-")
    perms = parts[1]
    major, _, minor = parts[3].partition(":")
    path = parts[5].strip() if len(parts) > 5 else ""
    deleted = path.endswith(_DELETED)
    if deleted:
        path = path[: -len(_DELETED)]
    shared = perms[3] == "s"
    inode = int(parts[4])
    return Vma(start=int(start, 16), end=int(end, 16), read=perms[0] == "r",
               write=perms[1] == "w", exec=perms[2] == "x", shared=shared,
               offset=int(parts[2], 16), dev_major=int(major, 16), dev_minor=int(minor, 16),
               inode=inode, path=path, deleted=deleted,
               kind=_kind(path, deleted, shared, inode))


def parse(text):
    return [parse_line(line) for line in text.splitlines() if line]


def maps(pid):
    """The VMAs of process pid, in address order."""
    return parse(read_text(pid, "maps"))
