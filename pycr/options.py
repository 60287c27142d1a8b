"""criu's options that change what a dump takes and a restore gives back.

They are asked deep inside (a socket's collector, the terminal code), so
they live here rather than in every signature: the CLI sets them once; the
Python API wraps a call in `with using(Options(tcp_established=True)):`.
"""

import contextlib
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Options:
    tcp_established: bool = False   # --tcp-established: take established TCP connections (TCP repair)
    ext_unix_sk: bool = False       # --ext-unix-sk: a unix socket whose peer is outside the tree reconnects
    shell_job: bool = False         # -j/--shell-job: the tree runs on the terminal it was started from
    file_locks: bool = False        # --file-locks: take flock and POSIX locks
    socket_handover: bool = False   # set by `pycr migrate` on one host: the replica takes the source's sockets
    sysv_handover: bool = False     # set by `pycr migrate` on one host: the replica attaches the source's SysV segments
    other_host: bool = False        # set by `pycr migrate --to`: the tree moves to another host
    lazy_anon: bool = False         # set by `pycr migrate --mode hybrid` for its final dump: private anonymous
                                    # pages are left in the frozen tree (holes), served to the replica on fault
    inherit_fds: tuple = ()         # --inherit-fd: (("pipe:[INO]", fd in pycr), ...): that pipe is this one


_current = Options()


def current():
    """The options of the command running now."""
    return _current


@contextlib.contextmanager
def using(options=None, **changes):
    """Run a block with `options` (or the current ones with `changes`)."""
    global _current
    before = _current
    _current = replace(options or before, **changes)
    try:
        yield _current
    finally:
        _current = before


def from_args(args):
    """The Options an argparse namespace asks for (flags it lacks stay off)."""
    flags = {name: bool(getattr(args, name, False)) for name in Options.__dataclass_fields__
             if name != "inherit_fds"}
    return Options(inherit_fds=tuple(getattr(args, "inherit_fd", None) or ()), **flags)
