"""criu's command-line conventions, for the `pycr` command (pycr/cli.py).

A criu user types `-v4 -o dump.log -W DIR --pidfile FILE` and expects them to
mean what they mean to criu: the levels of -vN, a log file written in the work
directory (default the images directory), paths relative to that directory,
and a pidfile holding the restored root's PID. Kept apart from cli.py so that
the parser stays a list of options.
"""

import argparse
import contextlib
import os
import re
import stat

from .errors import PycrError

#: criu's -vN levels (0-1 errors, 2 warnings and its default, 3 info, 4 debug) as pycr's
#: verbosity (-1 errors only, 0 warnings, 1 = -v: the narration, 2 = -vv: the detail).
_CRIU_LEVELS = {0: -1, 1: -1, 2: 0, 3: 1, 4: 2}


def criu_levels(argv):
    """criu's -vN (one token) as the hidden --criu-level N: argparse would take the N as -v's
    value only with nargs="?", which would also swallow the path of `pycr show -v DIR`."""
    return [f"--criu-level={arg[2:]}" if re.fullmatch(r"-v\d+", arg) else arg for arg in argv]


#: options criu takes before the command too (`criu -v4 -o d.log dump ...`): moved after the command
#: name, where that command's parser takes them (or says it has no such option); True: takes a value
_GLOBAL = {"-v": False, "--verbose": False, "-q": False, "--quiet": False, "--display-stats": False,
           "-o": True, "--log-file": True, "-D": True, "--images-dir": True, "-W": True, "--work-dir": True}


def global_options(argv, commands):
    """argv with the options given before the command name moved just after it: `pycr -v dump`
    is `pycr dump -v`. Anything else before the command is left where the top-level parser refuses it."""
    moved, i = [], 0
    while i < len(argv) and argv[i] not in commands:
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if re.fullmatch(r"-v+", arg) or name == "--criu-level" or (name in _GLOBAL and not _GLOBAL[name]):
            moved.append(arg)
        elif name in _GLOBAL and "=" in arg:
            moved.append(arg)
        elif name in _GLOBAL and i + 1 < len(argv):
            moved += argv[i:i + 2]
            i += 1
        elif re.fullmatch(r"-[oDW].+", arg):
            moved.append(arg)
        else:
            return argv                     # not ours to move: the parser says what is wrong
        i += 1
    if not moved or i == len(argv):
        return argv
    return [argv[i], *moved, *argv[i + 1:]]


def add_verbosity(p):
    p.add_argument("-v", "--verbose", action="count", default=None,
                   help="-v narrates each step in kernel terms, -vv adds detail and tracebacks of internal "
                        "errors; criu's levels: -v0 and -v1 errors only, -v2 warnings (the default), "
                        "-v3 as -v, -v4 as -vv")
    p.add_argument("--criu-level", type=_criu_level, help=argparse.SUPPRESS)


def _criu_level(text):
    if not text.isdigit() or int(text) not in _CRIU_LEVELS:
        raise argparse.ArgumentTypeError(f"-v{text}: criu's levels are -v0 to -v4")
    return int(text)


def add_output(p, work_dir=True, summary=True, written="-o is"):
    """-o, -W and -q, as criu takes the first two (written: what -W's help says goes there)."""
    p.add_argument("-o", "--log-file", metavar="FILE",
                   help="write the narration (-v level; -v if none is given) to FILE, relative to the work "
                        "directory; the terminal then gets only errors, the summary and a progress bar")
    if work_dir:
        p.add_argument("-W", "--work-dir", metavar="DIR",
                       help=f"where {written} written when relative (default: the images directory)")
    if summary:
        p.add_argument("-q", "--quiet", action="store_true",
                       help="print nothing on success (default: one line saying what was done)")


def chosen(args):
    """True when a -v or -vN was given."""
    return args.verbose is not None or args.criu_level is not None


def verbosity(args):
    """pycr's verbosity from -vN (the last word) or the count of -v (0 when neither was given)."""
    if args.criu_level is not None:
        return _CRIU_LEVELS[args.criu_level]
    return args.verbose or 0


def work_dir(args):
    """criu's rule: -W, else the images directory; migrate has no images directory: -W, else here."""
    return getattr(args, "work_dir", None) or getattr(args, "images_dir", None) or os.curdir


def in_work_dir(args, path):
    return os.path.join(work_dir(args), path)


INHERIT_FD = re.compile(r"fd\[(\d+)\]:(pipe:\[\d+\])")


def inherit_fd(text):
    """--inherit-fd fd[N]:pipe:[INO] -> ("pipe:[INO]", N); N must be a pipe open in pycr."""
    m = INHERIT_FD.fullmatch(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: give it as fd[N]:pipe:[INO] (pycr inherits pipes only)")
    fd = int(m.group(1))
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        raise argparse.ArgumentTypeError(f"{text}: fd {fd} is not open in pycr (open it for pycr: "
                                         f"`{fd}>&...` or a pipe on that fd)") from None
    if not stat.S_ISFIFO(mode):
        raise argparse.ArgumentTypeError(f"{text}: pycr's fd {fd} is not a pipe")
    return m.group(2), fd


def log_file_path(args):
    """Where -o writes, its directory made if pycr would make it anyway (a dump's); None without -o."""
    if not getattr(args, "log_file", None):
        return None
    path = in_work_dir(args, args.log_file)
    if args.command in ("dump", "pre-dump", "migrate"):
        with contextlib.suppress(OSError):         # the open below names what is wrong
            os.makedirs(os.path.dirname(path) or os.curdir, mode=0o700, exist_ok=True)
    return path


class PidFile:
    """--pidfile: made (empty, O_EXCL as criu does) before the restore begins, so that a name
    taken or not writable is refused before any task exists; filled once the tree runs;
    removed if the restore fails, so that it holds a PID only when the tree was restored."""

    def __init__(self, path):
        self.path = path
        self.filled = False
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            raise PycrError(f"{path}: the pidfile exists already: remove it or name another") from None
        except OSError as exc:
            raise PycrError(f"{path}: cannot make the pidfile: {exc.strerror}") from None
        os.close(fd)

    def fill(self, pid):
        with open(self.path, "w") as f:
            f.write(f"{pid}\n")
        self.filled = True

    def discard(self):
        if not self.filled:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def plural(n, word):
    return f"{n} {word}{'' if n == 1 else 'es' if word.endswith('s') else 's'}"


def dump_summary(command, stats, images_dir, leave_running):
    """The one line a successful dump or pre-dump prints."""
    what = "pre-dumped" if command == "pre-dump" else "dumped"
    after = "the tree goes on" if leave_running or command == "pre-dump" else "the tree was killed"
    return (f"{what} {plural(stats.processes, 'process')}, {plural(stats.threads, 'thread')}: "
            f"{stats.pages_bytes / (1 << 20):.1f} MiB of pages, frozen {stats.frozen_seconds:.3f} s; "
            f"images in {images_dir}; {after}")


def restore_summary(run, images_dir, seconds):
    """The one line a restore prints once the tree runs (before a foreground restore waits)."""
    root = run.tasks[run.images.root.pid]
    threads = sum(len(t.threads) for t in run.tasks.values())
    where = f" (pid {root.real} outside its namespace)" if root.real != root.pid else ""
    stopped = run.images.root.core.job_stopped      # a job stopped at the dump is stopped again
    return (f"restored {plural(len(run.tasks), 'process')}, {plural(threads, 'thread')} from {images_dir} "
            f"in {seconds:.3f} s; root pid {root.pid}{where} "
            + ("is stopped, as it was at the dump (SIGCONT it)" if stopped else "runs"))
