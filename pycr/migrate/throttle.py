"""Auto-converge: slow a tree's CPU while its memory is pre-copied.

When a tree dirties memory faster than the link carries it, no number of
passes converges; QEMU's auto-converge throttles the guest's vCPUs instead
(20 %, then +10 % per pass, up to 99 %). pycr throttles the source tree,
by as much as the policy aims from its measures (pycr.migrate.policy), with
whatever the kernel offers, probed in this order:

- cgroup v2 `cpu.max`, where the tree's cgroup2 parent has the cpu controller
  enabled for its children (a host where v2 holds cpu);
- cgroup v1 `cpu.cfs_quota_us`/`cpu.cfs_period_us`, where a v1 hierarchy
  carries cpu (a hybrid host);
- none: the throttle is reported as unavailable and the passes go on
  unthrottled (the pass limit still ends them).

The tree is moved into a throttle cgroup named after its root, whose name
alone says where its members came from, so a killed pycr needs no journal
to put them back: v1 makes it a child of the original cgroup
(`ORIG/pycr-throttle-ROOT`: back to the parent directory); v2 cannot (a
cgroup2 with processes cannot enable cpu for children), so it makes a
sibling (`PARENT/ORIG.pycr-throttle-ROOT`: back to PARENT/ORIG), or a child
of the root cgroup for a tree in the root. Threads that sit in different
v1 cgroups each go to a throttle group under their own, and come back to it.
Tasks forked while throttled are born in the group and leave it with the
rest (to their parent's original cgroup).

The quota is a share of the CPU the tree used in the pass before the
throttle began (`base_cores`), so that "20 %" takes a fifth of what the
tree really runs whether it has one busy thread or eight. The period is
PERIOD_US, short because a throttled thread reaches a freeze's ptrace stop
only when its quota lets it run; a share below MIN_QUOTA_US / PERIOD_US (the
kernel's smallest quota is 1 ms) lengthens it, up to MAX_PERIOD_US (a share
of 1 % of a CPU). While a pass holds the tree frozen the quota is relaxed
(relax()): each syscall pycr injects runs at once, not when the quota lets
the thread run; a pre-dump sets it again as it thaws the tree, and after the
final dump the tree leaves the group.

Leftovers: a pycr SIGKILLed while the throttle is on leaves the tree in its
group with the quota; `pycr check -t` lists it and `pycr cleanup -t` moves
every task back and removes the group (pycr.leftovers).

A SIGSTOP/SIGCONT duty cycle would work everywhere, but a killed pycr would
leave the tree stopped, and the stops are visible to the tree (its parent's
waitpid with WUNTRACED, SIGCHLD) and would race pycr's own ptrace freeze of
each pass: it is not done; see docs/design.md.
"""

import errno
import os
import re
import time
from dataclasses import dataclass

from pycr import proc
from pycr.errors import PycrError, TaskGone
from pycr.log import log
from pycr.proc.cgroup import cgroup, cgroup_mounts

TAG = "pycr-throttle-"
GROUP_NAME = re.compile(r"(?:(?P<orig>.+)\.)?pycr-throttle-(?P<root>\d+)")
PERIOD_US = 20_000          # short, as QEMU's 10 ms timeslice: a throttled thread waits at most this
                            # for its share, and so does every freeze of a pass for it to reach its stop
FIRST_PERCENT = 20          # QEMU's cpu-throttle-initial
STEP_PERCENT = 10           # QEMU's cpu-throttle-increment
MAX_PERCENT = 99            # QEMU's cpu-throttle maximum
MIN_QUOTA_US = 1000         # the kernel refuses a smaller cfs quota
MAX_PERIOD_US = 100_000     # the longest period pycr uses: a quota of 1 ms in it is 1 % of a CPU

V2 = "cgroup2 cpu.max"
V1 = "cgroup1 cpu.cfs_quota_us"


@dataclass
class Mechanism:
    kind: str           # V2, V1, or "" (none)
    detail: str         # where, or why none


def _dir(mount, path):
    """The directory of cgroup `path` under mount, or None if the mount does not show it."""
    if mount.root == "/":
        rel = path
    elif path == mount.root or path.startswith(mount.root.rstrip("/") + "/"):
        rel = path[len(mount.root.rstrip("/")):] or "/"
    else:
        return None
    return os.path.normpath(mount.mount_point + "/" + rel.lstrip("/"))


def _read(path):
    with open(path) as f:
        return f.read()


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _v2_home(pid):
    """(cgroup dir, group dir) for throttling pid with cgroup v2 cpu.max, or (None, why)."""
    mount = next((m for m in cgroup_mounts() if m.version == 2), None)
    if mount is None:
        return None, "no cgroup2 mount"
    member = next((m for m in cgroup(pid) if m.hierarchy == 0), None)
    if member is None:
        return None, "the task is in no cgroup2 cgroup"
    here = _dir(mount, member.path)
    if here is None:
        return None, f"its cgroup2 {member.path} is outside {mount.mount_point}"
    if _is_group(here):
        return None, f"already in a pycr throttle group ({here})"
    if member.path == "/" or here == mount.mount_point:
        enabled = _read(os.path.join(here, "cgroup.subtree_control")).split()
        if "cpu" not in enabled:
            return None, f"cpu is not enabled in {here}/cgroup.subtree_control (cgroup2 controllers: " \
                         f"{_read(os.path.join(here, 'cgroup.controllers')).strip() or 'none'})"
        return here, os.path.join(here, f"{TAG}{{root}}")
    available = _read(os.path.join(here, "cgroup.controllers")).split()
    if "cpu" not in available:
        return None, f"cgroup2 {member.path} has no cpu controller (its controllers: {' '.join(available) or 'none'})"
    parent, name = os.path.split(here)
    return here, os.path.join(parent, f"{name}.{TAG}{{root}}")


def _v1_mount():
    return next((m for m in cgroup_mounts() if m.version == 1 and "cpu" in m.controllers), None)


def _v1_home(pid, tid=None):
    """(cgroup dir, group dir) for throttling a thread with cgroup v1, or (None, why)."""
    mount = _v1_mount()
    if mount is None:
        return None, "no cgroup v1 hierarchy carries cpu"
    member = next((m for m in cgroup(pid, tid) if m.hierarchy and "cpu" in m.controllers), None)
    if member is None:
        return None, "the task is in no cgroup v1 cpu hierarchy"
    here = _dir(mount, member.path)
    if here is None:
        return None, f"its cpu cgroup {member.path} is outside {mount.mount_point}"
    if _is_group(here):
        return None, f"already in a pycr throttle group ({here})"
    if not os.path.exists(os.path.join(here, "cpu.cfs_quota_us")):
        return None, f"{here} has no cpu.cfs_quota_us (CONFIG_CFS_BANDWIDTH?)"
    return here, os.path.join(here, f"{TAG}{{root}}")


def _is_group(path):
    return GROUP_NAME.fullmatch(os.path.basename(path)) is not None


def original_of(group):
    """Where the members of throttle group `group` came from (its name says it)."""
    m = GROUP_NAME.fullmatch(os.path.basename(group))
    parent = os.path.dirname(group)
    return os.path.join(parent, m.group("orig")) if m.group("orig") else parent


def probe(pid):
    """The mechanism that would throttle pid here -> Mechanism (kind "" if none).

    Read from the cgroup files the kernel shows; throttle() then really
    makes the group, and falls back if the kernel refuses.
    """
    forced = os.environ.get("PYCR_THROTTLE", "")
    if forced not in ("", "cgroup2", "cgroup1", "off"):
        raise PycrError(f"PYCR_THROTTLE={forced!r}: one of cgroup2, cgroup1, off")
    why = []
    for kind, home, name in ((V2, _v2_home, "cgroup2"), (V1, _v1_home, "cgroup1")):
        if forced and forced != name:
            why.append(f"{name}: not chosen (PYCR_THROTTLE={forced})")
            continue
        try:
            here, group = home(pid)
        except OSError as exc:
            here, group = None, exc.strerror
        if here is not None:
            return Mechanism(kind, f"{kind} ({here} -> {group.replace('{root}', str(pid))})")
        why.append(f"{name}: {group}")
    return Mechanism("", "; ".join(why))


class Throttle:
    """The CPU throttle of one tree: set(percent) moves it in and sets the quota, lift() undoes it all.

    base_cores: the CPUs the tree used before (the quota is (100 - percent) %
    of that). Never raises from lift(): the tree must not stay throttled
    because one task could not be moved.
    """

    def __init__(self, root, base_cores):
        self.root = root
        self.base_cores = max(base_cores, 0.05)
        self.mechanism = probe(root)
        self.percent = 0
        self.groups = {}            # group dir -> original cgroup dir

    @property
    def available(self):
        return bool(self.mechanism.kind)

    def quota_us(self, percent):
        """(quota, period) in us for taking `percent` % of base_cores away."""
        share = self.base_cores * (100 - percent) / 100         # CPUs
        if PERIOD_US * share >= MIN_QUOTA_US:
            return int(PERIOD_US * share), PERIOD_US
        period = min(MAX_PERIOD_US, int(MIN_QUOTA_US / max(share, 1e-9)))
        return max(MIN_QUOTA_US, int(period * share)), period

    def set(self, percent):
        """Throttle the tree to (100 - percent) % of its CPU; moves new tasks in too."""
        if not self.available:
            return False
        percent = min(percent, MAX_PERCENT)
        quota, period = self.quota_us(percent)
        try:
            self._enter(quota, period)
        except (OSError, PycrError) as exc:
            log.warning("warning: cannot throttle the tree with %s (%s): it goes on unthrottled",
                        self.mechanism.kind, getattr(exc, "strerror", None) or exc)
            self.lift()
            self.mechanism = Mechanism("", f"{self.mechanism.kind} refused: {exc}")
            return False
        self.percent = percent
        log.info("throttle %d %%: %s quota %d us per %d us (%.3f of the %.3f CPUs the tree used)",
                 percent, self.mechanism.kind, quota, period, quota / period, self.base_cores)
        return True

    def _enter(self, quota, period):
        v1 = self.mechanism.kind == V1
        for pid in proc.descendants(self.root):
            try:
                for tid in (proc.tasks(pid) if v1 else [None]):
                    here_group = self._group_of(pid, tid)
                    if here_group is None:
                        continue        # already in one of ours (born there)
                    here, group = here_group
                    if group not in self.groups:
                        self._make(group, here, quota, period)
                    _write(os.path.join(group, "tasks" if v1 else "cgroup.procs"), str(tid or pid))
            except TaskGone:
                continue
            except ProcessLookupError:
                continue
        for group in self.groups:
            self._quota(group, quota, period)

    def _group_of(self, pid, tid):
        home = _v1_home(pid, tid) if self.mechanism.kind == V1 else _v2_home(pid)
        here, group = home
        if here is None:
            if "already in a pycr throttle group" in group:
                return None
            raise PycrError(group)
        return here, group.replace("{root}", str(self.root))

    def _make(self, group, here, quota, period):
        try:
            os.mkdir(group, 0o755)
        except FileExistsError:
            pass                # an empty one left by a killed pycr: take it over
        self.groups[group] = here
        self._quota(group, quota, period)
        log.info("made throttle cgroup %s (members come back to %s)", group, here)

    def _quota(self, group, quota, period):
        """quota None: no limit (the group stays)."""
        if self.mechanism.kind == V1:
            if quota is None:
                _write(os.path.join(group, "cpu.cfs_quota_us"), "-1")
                return
            _write(os.path.join(group, "cpu.cfs_period_us"), str(period))
            _write(os.path.join(group, "cpu.cfs_quota_us"), str(quota))
        else:
            _write(os.path.join(group, "cpu.max"), f"{'max' if quota is None else quota} {period}")

    def relax(self):
        """No quota for now, the tree still in its group (while a pass holds it frozen). Never raises."""
        for group in self.groups:
            try:
                self._quota(group, None, PERIOD_US)
            except OSError as exc:
                log.warning("warning: cannot relax the quota of %s: %s", group, exc.strerror)
        if self.groups:
            log.info("throttle relaxed while the tree is frozen (it is %d %%)", self.percent)

    def lift(self):
        """Every task back to its cgroup, the groups removed. -> True if all went well."""
        ok = True
        for group, here in list(self.groups.items()):
            ok = release(group, here) and ok
            del self.groups[group]
        if self.percent:
            log.info("throttle lifted (it was %d %%)", self.percent)
        self.percent = 0
        return ok


def members(group):
    """TIDs (v1 `tasks`) or PIDs (v2 `cgroup.procs`) in a throttle group, and the file to move them with."""
    name = "tasks" if os.path.exists(os.path.join(group, "tasks")) else "cgroup.procs"
    return [int(x) for x in _read(os.path.join(group, name)).split()], name


def release(group, here=None):
    """Move every task of throttle group `group` back to `here` (default: what its name says), remove it.

    -> True if the group is gone. Loops: a task may fork while it is moved.
    """
    here = here or original_of(group)
    for _ in range(100):
        try:
            ids, name = members(group)
        except FileNotFoundError:
            return True
        if not ids:
            break
        for ident in ids:
            try:
                _write(os.path.join(here, name), str(ident))
            except ProcessLookupError:
                pass
            except OSError as exc:
                log.warning("warning: cannot move %d out of throttle group %s: %s", ident, group, exc.strerror)
                return False
    for _ in range(50):
        try:
            os.rmdir(group)
            log.info("removed throttle cgroup %s; its tasks are back in %s", group, here)
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                log.warning("warning: cannot remove throttle group %s: %s", group, exc.strerror)
                return False
            time.sleep(0.01)        # a task still leaving (exiting)
    log.warning("warning: throttle group %s is still busy", group)
    return False


def groups_of(pid):
    """The throttle groups process pid (or one of its threads) sits in -> {group dir}."""
    mounts = cgroup_mounts()
    found = set()
    for tid in proc.tasks(pid):
        try:
            memberships = cgroup(pid, tid)
        except TaskGone:
            continue
        for member in memberships:
            if not _is_group(member.path):
                continue
            for mount in mounts:
                if (mount.version == 2) != (member.hierarchy == 0):
                    continue
                if mount.version == 1 and not set(member.controllers) & set(mount.controllers):
                    continue
                where = _dir(mount, member.path)
                if where is not None and os.path.isdir(where):
                    found.add(where)
                    break
    return found
