"""The destination loop of an incremental restore.

Ask the transport for the next image set, apply it to the replica, and on the
final one (a dump) finish and resume the replica. Whatever fails before that,
the transport hears finish(False) first (a migration source is thawed at
once) and the replica is discarded; after the resume it hears finish(True).
"""

import time
from dataclasses import dataclass, field

from pycr import progress
from pycr.log import log
from pycr.migrate import report
from pycr.migrate.replica import FINAL_KINDS, Replica
from pycr.migrate.stream import PassStream
from pycr.restore.load import load_images
from pycr.restore.preflight import PIDS_TAKEN
from pycr.steps import finish


@dataclass
class FollowResult:
    replica: Replica
    reports: list = field(default_factory=list)
    resumed_at: float = 0.0         # time.monotonic() of the resume


def follow(transport, pidns=False, on_image_set=None, on_pass=None, trust_images=False):
    """Run an incremental restore from `transport` until the replica runs -> FollowResult.

    on_image_set(number, path) is called before a set is applied and
    on_pass(PassReport, replica) after (both may raise to abandon the restore).
    With pidns, the namespace's init is detached with the rest at the resume; the
    caller can still collect the root's exit status (Restore.wait_root).
    trust_images: accept sets another user owns or may write (see restore.trust).
    """
    replica = Replica(pidns, getattr(transport, "pids_advice", PIDS_TAKEN))
    result = FollowResult(replica)
    ok = False
    try:
        while True:
            stream = PassStream(replica, trust_images)
            path = transport.next_image_set(stream)
            number = len(result.reports) + 1
            if on_image_set is not None:
                on_image_set(number, path)
            started = time.monotonic()
            # Later sets: in_parent runs are in the replica already; following them all up
            # the chain would only add to the downtime (write_resolved follows those it needs).
            with progress.muted() if getattr(transport, "shows_progress", False) else progress.step(f"pass {number}"):
                if stream.staged is not None:   # its pages went into the replica as they arrived
                    changes = replica.complete(stream.staged)
                else:
                    images = load_images(path, allow_pre_dump=True, resolve_chain=replica.run is None,
                                         trust_images=trust_images, allow_lazy=transport.lazy_link is not None)
                    changes = replica.apply(images, lazy=transport.lazy_link)
            final = changes.kind in FINAL_KINDS
            if final:
                transport.commit(replica)   # the commit point: returns once the replica may run
                replica.resume()
                result.resumed_at = time.monotonic()
                finish("restore")           # restore --follow is complete once the tree runs
            rep = report.for_pass(changes, path, getattr(transport, "last_seconds", 0.0),
                                  time.monotonic() - started)
            if hasattr(transport, "applied"):
                transport.applied(rep)      # a source that measures its passes adds its figures
            result.reports.append(rep)
            log.info("%s", rep.line())
            if on_pass is not None:
                on_pass(rep, replica)
            if final:
                ok = True
                return result
    finally:
        if ok:
            transport.finish(True)
        else:
            log.info("incremental restore failed: the replica is discarded")
            try:
                transport.finish(False)
            finally:
                replica.discard()
