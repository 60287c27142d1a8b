"""Migrations whose replica serve killed while their source was out of reach.

After the switch of a post-copy or hybrid migration the source tree is held
stopped until its last page has moved. If the link stays down past the
destination's reconnect window, the destination's watchdog kills the replica
and sees every task of it exit: the source's tree is then the one copy, and
whole. The source waits twice as long, so it may come back after that. serve
remembers such a migration (its ID and image set) until the source's window
is over, and answers its LAZY_RESUME as the lazy-pages daemon would have:
it opens the set (LAZY_OPEN, resumed, nothing wanted) and says REPLICA_GONE;
the source thaws its tree, answers SOURCE_THAWED, and its migrate says so in
one line. Without this the tree would stay stopped until someone sent it
SIGCONT. Only an authenticated source that names the migration's random ID
is told; anyone else gets an ERROR.
"""

import threading
import time

from ..formats.wire import FrameType
from ..lazy.remote_source import reconnect_window
from ..log import log

SLACK = 5.0     # s past the source's window: its last dial may be in flight


class Gone:
    """migration ID -> its image set's ID, for as long as its source may still dial."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_id = {}

    def add(self, migration_id, set_id):
        until = time.monotonic() + 2 * reconnect_window() + SLACK
        with self._lock:
            self._by_id[bytes(migration_id)] = (bytes(set_id), until)

    def take(self, migration_id):
        """-> the set ID of a gone migration's replica (forgotten from now), or None."""
        now = time.monotonic()
        with self._lock:
            self._by_id = {k: v for k, v in self._by_id.items() if v[1] > now}
            got = self._by_id.pop(bytes(migration_id), None)
        return got[0] if got else None


def tell(chan, set_id):
    """Say REPLICA_GONE on a source's new connection (its LAZY_RESUME read): it thaws its tree."""
    chan.send(FrameType.LAZY_OPEN, {"set_id": set_id, "resumed": 1, "wanted": []})
    chan.recv(FrameType.LAZY_READY)
    chan.send(FrameType.REPLICA_GONE, {})
    chan.recv(FrameType.SOURCE_THAWED)
    log.warning("pycr serve: %s: came back after its replica was killed: told it so; its tree runs again "
                "there", chan.name)
