"""Two dumps, then two restores, at the same time in one Python process (two threads):
each owns its buffers (a Copier per dump, stream buffers per restore), so neither
sees the other's pages."""

import threading

from pycr.dump import dump_tree
from pycr.native import core
from pycr.restore import restore


def _in_threads(*calls):
    errors, threads = [], []

    def run(call):
        try:
            call()
        except BaseException as exc:      # handed to the test below
            errors.append(exc)

    for call in calls:
        threads.append(threading.Thread(target=run, args=(call,)))
        threads[-1].start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors


def test_two_dumps_and_two_restores_in_two_threads(spawn, tmp_path, cleanup_pids):
    a, b = spawn("bigmem", 4), spawn("bigmem", 4)
    import signal
    sums = {w.pid: w.signal_and_wait(signal.SIGUSR1, r"^sum ([0-9a-f]+)$", timeout=30).group(1) for w in (a, b)}
    cleanup_pids.add(a.pid, b.pid)
    _in_threads(lambda: dump_tree(a.pid, tmp_path / "a"), lambda: dump_tree(b.pid, tmp_path / "b"))
    assert core.Copier.current() is None
    _in_threads(lambda: restore(tmp_path / "a", detach=True), lambda: restore(tmp_path / "b", detach=True))
    for w in (a, b):
        assert w.signal_and_wait(signal.SIGUSR1, r"^sum ([0-9a-f]+)$", timeout=30).group(1) == sums[w.pid]


def test_a_copier_is_this_threads_until_its_block_ends():
    seen = []
    with core.Copier(1 << 20) as mine:
        t = threading.Thread(target=lambda: seen.append(core.Copier.current()))
        t.start()
        t.join()
        assert core.Copier.current() is mine
    assert seen == [None]
    assert core.Copier.current() is None
