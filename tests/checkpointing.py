"""Taking a test's workload through pycr the ways the kind tests share: dump and show an image,
pycr migrate, pycr restore --follow. Every PID a step makes is registered for cleanup."""

import re
import signal
import subprocess
import sys

import procutil
from pycrcmd import pycr

MIGRATED = re.compile(r"\(pid (\d+) outside its namespace, namespace init (\d+)\)")


def dump_and_show(pid, tmp_path, cleanup_pids, image):
    """`pycr dump` of pid's tree into tmp_path/img: that directory and `pycr show --json` of its image
    `image` (the dumped tree is gone: pid is registered for the restored one)."""
    dump_dir = tmp_path / "img"
    pycr("dump", "-t", pid, "-D", dump_dir)
    cleanup_pids.add(pid)
    return dump_dir, pycr("show", dump_dir / f"{image}.img", "--json").stdout


def migrated(pid, cleanup_pids, *options, timeout=120):
    """`pycr migrate -t pid *options`: the replica's root and namespace init, seen from here,
    both registered for cleanup."""
    proc = pycr("migrate", "-t", pid, *options, timeout=timeout)
    m = MIGRATED.search(proc.stdout)
    assert m, proc.stdout
    root, init = int(m.group(1)), int(m.group(2))
    cleanup_pids.add(init, root)
    return root, init


def migrate_with_new_contents(w, cleanup_pids, *pids):
    """In-process `pycr migrate` of w in three passes; between them SIGUSR2 makes w write its next
    generation ("gen N") so that each pass has new contents. w's pids are registered once it is gone."""
    from test_migrate import registering
    from pycr.migrate import migrate
    from pycr.migrate.loop import Policy

    def between(rep, replica):
        if rep.kind == "pre-dump":
            w.signal_and_wait(signal.SIGUSR2, rf"^gen {rep.number + 1}$")

    res = migrate(w.pid, policy=Policy(max_passes=3, min_delta=0), on_pass=registering(cleanup_pids, then=between))
    cleanup_pids.add(w.pid, *pids)
    assert [r.kind for r in res.reports] == ["pre-dump", "pre-dump", "dump"]
    return res


class Follower:
    """`pycr restore -D top --follow --pidns -d` beside the test, applying passes as they come;
    killed on leaving the with block if it has not finished."""

    def __init__(self, top):
        self.proc = subprocess.Popen([sys.executable, "-m", "pycr", "restore", "-D", top, "--follow", "--pidns",
                                      "-d", "--follow-timeout", "60"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, close_fds=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stopped_replica(self, cleanup_pids):
        """The replica's root once the first pass made it (stopped until the dump); every task
        under the follower is registered for cleanup."""
        def found():
            for outer in procutil.children(self.proc.pid):
                cleanup_pids.add(outer, *procutil.descendants(outer))
                kids = procutil.descendants(outer)
                if kids and procutil.state(kids[0]) == "t":
                    return kids[0]
            return None

        replica = procutil.wait_until(found, timeout=20)
        assert replica is not None, "no replica appeared after the first pass"
        return replica

    def finish(self):
        """The follower applied the final dump and exited 0."""
        _, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
