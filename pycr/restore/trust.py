"""Who may have written the images, and what a restore may give to the tree they describe.

A restore as root turns whatever the images say into real credentials, open
files and mappings. So, as ssh's StrictModes does for keys: by default every
image directory of the set (and of its chain), every file in it and every
directory above it must belong to the restoring user or root and be writable
by no one else (a sticky world-writable directory like /tmp is fine above it).
--trust-images lifts that. Then, and whenever a non-root user U owns the
images, the tree may receive only what U could have had: every uid is U's,
every gid one of U's groups, no capability, and every file it is handed, mapped
or started in must be accessible to U with that mode (asked of the kernel by
a child that takes U's credentials and calls access()).
"""

import os
import pwd
import stat

from pycr.abi import O_ACCMODE, O_PATH, O_RDWR, O_WRONLY, PROT_WRITE
from pycr.errors import ImageError, RestoreError
from pycr.images import classify_name
from pycr.restore import kinds

ADVICE = "check them, then pass --trust-images"


def image_paths(dirs):
    """Every image directory and every image file in them (by name)."""
    for d in dirs:
        yield d
        for name in sorted(os.listdir(d)):
            if classify_name(name):
                yield os.path.join(d, name)


def check_modes(dirs):
    """Refuse images someone other than the restoring user (or root) owns or may write."""
    me = os.geteuid()
    for path in image_paths(dirs):
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            raise ImageError(path, f"is a symbolic link; {ADVICE}")
        _check_one(path, st, me, sticky_ok=False)
    for d in dirs:
        above = os.path.dirname(os.path.realpath(d))
        while True:
            _check_one(above, os.stat(above), me, sticky_ok=True)
            if above == "/":
                break
            above = os.path.dirname(above)


def _check_one(path, st, me, sticky_ok):
    if st.st_uid not in (me, 0):
        raise ImageError(path, f"owned by uid {st.st_uid}, not by you (uid {me}) or root: "
                               f"someone else could have written the images; {ADVICE}")
    if st.st_mode & 0o022 and not (sticky_ok and st.st_mode & stat.S_ISVTX and stat.S_ISDIR(st.st_mode)):
        who = "group and others" if st.st_mode & 0o022 == 0o022 else "group" if st.st_mode & 0o020 else "others"
        raise ImageError(path, f"writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}): "
                               f"someone else could have written the images; {ADVICE}")


def owner_of(dirs):
    """The non-root user who owns any of the images, or None if root owns them all."""
    owners = {os.lstat(p).st_uid for p in image_paths(dirs)} - {0}
    if len(owners) > 1:
        raise ImageError(dirs[0], f"images owned by several users (uids {sorted(owners)}): "
                                  "pycr cannot tell whose rights the restored tree may have")
    return owners.pop() if owners else None


def user_groups(uid, where):
    """(primary gid, every gid) of uid in the user database."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        raise ImageError(where, f"owned by uid {uid}, which has no entry in the user database: "
                                "pycr cannot tell which groups it may have") from None
    return entry.pw_gid, set(os.getgrouplist(entry.pw_name, entry.pw_gid))


def check_owner_bound(images, uid):
    """Refuse images that would give the tree what their owner uid could not have.

    Credentials: every uid is uid, every gid and supplementary group one of its
    groups, no capability in the inheritable, permitted, effective or ambient
    sets (the bounding set can only take away). Files: see check_access.
    """
    imgdir = images.imgdir
    primary, groups = user_groups(uid, imgdir.path)
    for p in images.processes:
        c = p.core.creds
        where = imgdir.path_of("core", p.pid)
        uids = {c.uid, c.euid, c.suid, c.fsuid}
        if uids != {uid}:
            raise ImageError(where, f"pid {p.pid} would run as uid {sorted(uids)}, but the images belong to "
                                    f"uid {uid}, who could not: {ADVICE_BOUND}")
        gids = {c.gid, c.egid, c.sgid, c.fsgid} | set(c.groups)
        if not gids <= groups:
            raise ImageError(where, f"pid {p.pid} would have gids {sorted(gids - groups)}, not groups of "
                                    f"uid {uid}, who owns the images: {ADVICE_BOUND}")
        caps = c.cap_inh | c.cap_prm | c.cap_eff | c.cap_amb
        if caps:
            raise ImageError(where, f"pid {p.pid} would have capabilities {caps:#x}, but the images belong "
                                    f"to uid {uid}: {ADVICE_BOUND}")
    if os.geteuid() != uid:          # the owner restoring its own images opens as itself anyway
        check_access(images, uid, primary, groups)


ADVICE_BOUND = "images a user owns restore only with that user's uid, groups and no capabilities"


def _wanted_access(images):
    """(path, access mode, image file, what) for every file the restore would hand the tree."""
    imgdir = images.imgdir
    for p in images.processes:
        for rec in p.fds:
            kind = str(rec.type)
            if kind in ("pipe", "unsupported") or kind in kinds.TYPES:
                continue
            acc = rec.flags & O_ACCMODE
            mode = (os.F_OK if rec.flags & O_PATH else
                    os.W_OK if acc == O_WRONLY else os.R_OK | os.W_OK if acc == O_RDWR else os.R_OK)
            yield rec.path, mode, imgdir.path_of("files"), f"pid {p.pid} fd {rec.fd}"
        for vma in p.mm.vmas:
            if str(vma.kind) != "file":
                continue
            mode = os.R_OK | (os.W_OK if vma.shared and vma.prot & PROT_WRITE else 0)
            yield vma.path, mode, imgdir.path_of("mm", p.pid), f"pid {p.pid} mapping {vma.start:#x}"
        if p.mm.exe:
            yield p.mm.exe, os.X_OK, imgdir.path_of("mm", p.pid), f"pid {p.pid} executable"
        for what in ("cwd", "root"):
            yield p.core[what], os.X_OK, imgdir.path_of("core", p.pid), f"pid {p.pid} {what}"


def check_access(images, uid, gid, groups):
    """Ask the kernel, as uid with its groups, whether each file the tree gets is accessible."""
    wanted = list(_wanted_access(images))
    r, w = os.pipe()
    child = os.fork()
    if child == 0:                       # pragma: no cover - the child only calls access()
        status = 0
        try:
            os.close(r)
            os.setgroups(sorted(groups))
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            for i, (path, mode, _, _) in enumerate(wanted):
                if not os.access(path, mode):
                    os.write(w, str(i).encode())
                    status = 1
                    break
        except BaseException:
            status = 2
        os._exit(status)
    os.close(w)
    try:
        answer = os.read(r, 64)
    finally:
        os.close(r)
    _, status = os.waitpid(child, 0)
    if os.waitstatus_to_exitcode(status) == 2:
        raise RestoreError(f"cannot take the credentials of uid {uid} to check its access to the files")
    if answer:
        path, mode, where, what = wanted[int(answer)]
        how = "".join(c for c, bit in (("r", os.R_OK), ("w", os.W_OK), ("x", os.X_OK)) if mode & bit) or "reach"
        raise ImageError(where, f"{what}: uid {uid}, who owns the images, may not {how} {path}: {ADVICE_BOUND}")
