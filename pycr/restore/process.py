"""Per-process kernel state: name, personality, umask, cwd/root, signal handlers,
rlimits, no_new_privs, seccomp filters and, last of all, credentials.

Credentials go last because once they drop, the task may no longer be
allowed to do the rest; seccomp filters go after the threads exist so that
TSYNC puts them on every thread (pycr's injections are exempt: the tasks are
seized with PTRACE_O_SUSPEND_SECCOMP).
"""

import os
import resource
import struct
from signal import SIGKILL, SIGSTOP

from pycr import proc
from pycr.abi import (ARCH_REQ_XCOMP_PERM, LINUX_CAPABILITY_VERSION_3, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, PR_CAP_AMBIENT_RAISE,
                      PR_CAPBSET_DROP, PR_SET_KEEPCAPS, PR_SET_NAME, PR_SET_NO_NEW_PRIVS, RLIM_INFINITY,
                      SECCOMP_FILTER_FLAG_TSYNC, SECCOMP_SET_MODE_FILTER, SECCOMP_SET_MODE_STRICT)
from pycr.errors import RestoreError
from pycr.log import log
from pycr.ptrace import xstate as X

KSIGACTION = struct.Struct("<QQQQ")
SOCK_FPROG = struct.Struct("<HxxxxxxQ")
CAP_HEADER = struct.Struct("<Ii")
CAP_DATA = struct.Struct("<III")
DELETED = " (deleted)"


def set_identity(remote, core):
    """comm (before threads are cloned, which copy it), personality and umask."""
    name = os.fsencode(core.comm)[:15] + b"\0"
    remote.check("prctl", PR_SET_NAME, remote.put(name), what="PR_SET_NAME")
    remote.check("personality", core.personality, what=f"{core.personality:#x}")
    remote.check("umask", core.umask, what=f"{core.umask:o}")
    remote.reset_scratch()


def set_dirs(remote, core):
    """cwd, then root (chdir uses the path as seen from pycr's root)."""
    for what, path in (("cwd", core.cwd), ("root", core.root)):
        if path.endswith(DELETED):
            raise RestoreError(f"pid {remote.pid}: its {what} {path[:-len(DELETED)]} was deleted")
    remote.check("chdir", remote.put_str(core.cwd), what=core.cwd)
    if core.root != "/":
        remote.check("chroot", remote.put_str(core.root), what=core.root)
    remote.reset_scratch()


def set_xcomp_perm(remote, core):
    """Ask again for the dynamic xstate components (AMX tile data) the process had:
    the kernel accepts such state in SETREGSET only for a process granted it."""
    for i in range(64):
        if core.xcomp_perm >> i & 1:
            remote.check("arch_prctl", ARCH_REQ_XCOMP_PERM, i,
                         what=f"ARCH_REQ_XCOMP_PERM, {X.COMPONENT_NAMES.get(i, i)}")
            log.info("pid %d: xstate component %s permitted again (arch_prctl ARCH_REQ_XCOMP_PERM)",
                     remote.pid, X.COMPONENT_NAMES.get(i, i))


def set_sigactions(remote, core):
    """rt_sigaction for every signal whose action is not the default (sa_restorer kept),
    all in one batch (one ptrace stop)."""
    sigs, calls = [], []
    for index, act in enumerate(core.sigactions):
        sig = index + 1
        if sig in (SIGKILL, SIGSTOP) or not (act.handler or act.flags or act.mask):
            continue
        addr = remote.put(KSIGACTION.pack(act.handler, act.flags, act.restorer, act.mask))
        sigs.append(sig)
        calls.append(("rt_sigaction", sig, addr, 0, 8))
    for sig, res in zip(sigs, remote.call_batch(calls)):
        if res < 0:
            raise RestoreError(f"pid {remote.pid}: rt_sigaction({sig}) failed: {os.strerror(-res)}")
    remote.reset_scratch()
    log.info("pid %d: %d signal handlers set with rt_sigaction", remote.pid, len(sigs))


def check_rlimits(pid, core, known=None):
    """Refuse, before any task exists, a limit this kernel does not know (the image came
    from a newer one) unless it is unlimited/unlimited, which is what its absence means."""
    known = proc.rlimit_count() if known is None else known
    for res in range(known, len(core.rlimits)):
        lim = core.rlimits[res]
        if (lim.cur, lim.max) != (RLIM_INFINITY, RLIM_INFINITY):
            raise RestoreError(f"pid {pid}: {proc.rlimit_name(res)} ({lim.cur}/{lim.max}) is not known "
                               f"to this kernel, which has {known} limits")


def set_rlimits(remote, core):
    """prlimit64 for every limit both kernels know (check_rlimits refused the others).
    A hard limit above pycr's own cannot be raised here (this needs
    CAP_SYS_RESOURCE): it is kept at pycr's and a warning says so."""
    known = proc.rlimit_count()
    for res, lim in enumerate(core.rlimits[:known]):
        cur, hard = lim.cur, lim.max
        addr = remote.put(struct.pack("<QQ", cur, hard))
        got = remote.call("prlimit64", 0, res, addr, 0)
        if got == -1:                       # EPERM: the hard limit cannot go up
            _, my_hard = resource.getrlimit(res)
            my_hard = RLIM_INFINITY if my_hard == resource.RLIM_INFINITY else my_hard
            log.warning("pid %d: %s: hard limit %d is above pycr's %d; kept at %d",
                        remote.pid, proc.rlimit_name(res), hard, my_hard, my_hard)
            addr = remote.put(struct.pack("<QQ", min(cur, my_hard), my_hard))
            got = remote.call("prlimit64", 0, res, addr, 0)
        if got < 0:
            raise RestoreError(f"pid {remote.pid}: prlimit64({proc.rlimit_name(res)}) failed: {os.strerror(-got)}")
        remote.reset_scratch()


def set_seccomp(remote, core):
    """no_new_privs, then the filters oldest first with TSYNC (threads exist by now)."""
    if core.no_new_privs:
        remote.check("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0, what="PR_SET_NO_NEW_PRIVS")
    mode = str(core.seccomp_mode)
    if mode == "filter":
        for prog in core.seccomp_filters:
            prog = bytes(prog)
            insns = remote.put(prog)
            fprog = remote.put(SOCK_FPROG.pack(len(prog) // 8, insns))
            remote.check("seccomp", SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, fprog,
                         what="SECCOMP_SET_MODE_FILTER, TSYNC")
            remote.reset_scratch()
        log.info("pid %d: %d seccomp filters installed", remote.pid, len(core.seccomp_filters))
    elif mode == "strict":
        remote.check("seccomp", SECCOMP_SET_MODE_STRICT, 0, 0, what="SECCOMP_SET_MODE_STRICT")


def _my_creds():
    st = proc.status("self")
    caps = {"CapInh": st.cap_inh, "CapPrm": st.cap_prm, "CapEff": st.cap_eff, "CapBnd": st.cap_bnd,
            "CapAmb": st.cap_amb}
    return os.getresuid(), os.getresgid(), sorted(os.getgroups()), caps


def set_creds(remote, core):
    """Groups, gids, uids and capabilities as dumped, changing only what differs from
    pycr's own (which the task inherited): setgroups, setresgid and setresuid need
    CAP_SETGID/CAP_SETUID even to set the same values, and a user restoring their
    own processes has neither. Capabilities can always be dropped."""
    c = core.creds
    uids, gids, groups, caps = _my_creds()
    want_caps = (c.cap_inh, c.cap_prm, c.cap_eff, c.cap_bnd, c.cap_amb)
    ids_same = (tuple(uids) == (c.uid, c.euid, c.suid) and c.fsuid == c.euid
                and tuple(gids) == (c.gid, c.egid, c.sgid) and c.fsgid == c.egid)
    groups_same = sorted(c.groups) == groups
    caps_same = (caps["CapInh"], caps["CapPrm"], caps["CapEff"], caps["CapBnd"], caps["CapAmb"]) == want_caps
    if ids_same and groups_same and caps_same:
        return
    for cap in range(64):
        if caps["CapBnd"] >> cap & 1 and not c.cap_bnd >> cap & 1:
            remote.call("prctl", PR_CAPBSET_DROP, cap, 0, 0, 0)
    remote.check("prctl", PR_SET_KEEPCAPS, 1, 0, 0, 0, what="PR_SET_KEEPCAPS")
    if not groups_same:
        groups_addr = remote.put(struct.pack(f"<{len(c.groups)}I", *c.groups)) if c.groups else 0
        remote.check("setgroups", len(c.groups), groups_addr, what=f"{len(c.groups)} groups")
    if tuple(gids) != (c.gid, c.egid, c.sgid):
        remote.check("setresgid", c.gid, c.egid, c.sgid, what=f"{c.gid}, {c.egid}, {c.sgid}")
    remote.call("setfsgid", c.fsgid)
    if tuple(uids) != (c.uid, c.euid, c.suid):
        remote.check("setresuid", c.uid, c.euid, c.suid, what=f"{c.uid}, {c.euid}, {c.suid}")
    remote.call("setfsuid", c.fsuid)
    header = remote.put(CAP_HEADER.pack(LINUX_CAPABILITY_VERSION_3, 0))
    data = remote.put(CAP_DATA.pack(c.cap_eff & 0xFFFFFFFF, c.cap_prm & 0xFFFFFFFF, c.cap_inh & 0xFFFFFFFF)
                      + CAP_DATA.pack(c.cap_eff >> 32, c.cap_prm >> 32, c.cap_inh >> 32))
    remote.check("capset", header, data, what="capset")
    remote.check("prctl", PR_SET_KEEPCAPS, 0, 0, 0, 0, what="PR_SET_KEEPCAPS")
    remote.call("prctl", PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    for cap in range(64):
        if c.cap_amb >> cap & 1:
            remote.call("prctl", PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0)
    remote.reset_scratch()
    log.info("pid %d: credentials uid %d gid %d set", remote.pid, c.uid, c.gid)
