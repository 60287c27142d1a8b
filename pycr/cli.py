"""The `pycr` command: criu-like subcommands over pycr's Python API.

Every expected failure is a PycrError and becomes one line on stderr and exit
status 1; pycr never shows a traceback unless asked with -vv.
"""

import argparse
import contextlib
import errno
import signal
import sys
import time

from . import __version__, cliopts, options, progress, stats, steps
from .errors import Interrupted, PycrError
from . import log as pycr_log


def _add_display_stats(p):
    p.add_argument("--display-stats", action="store_true",
                   help="print where the time went (interpreter start, freeze, page copy...) and what was "
                        "moved, as criu does")


def _add_common(p):
    cliopts.add_verbosity(p)


def _add_object_options(p, restore=False):
    """criu's options for kernel objects that need the user's word (pycr/options.py)."""
    if restore:
        p.add_argument("--tcp-established", action="store_true",
                       help="accepted as criu needs it on restore too; pycr brings back the established TCP "
                            "connections the images hold (a dump takes them only with --tcp-established)")
        p.add_argument("--ext-unix-sk", action="store_true",
                       help="accepted as criu takes it; pycr reconnects the unix sockets whose peer was outside "
                            "the tree that the images hold (taken by a dump with --ext-unix-sk)")
        p.add_argument("-j", "--shell-job", action="store_true",
                       help="a tree dumped with -j: its terminal becomes pycr's (without it such images are "
                            "refused)")
        p.add_argument("--file-locks", action="store_true",
                       help="accepted as criu takes it; pycr sets again the file locks the images hold "
                            "(taken by a dump with --file-locks)")
        p.add_argument("--inherit-fd", action="append", type=cliopts.inherit_fd, metavar="fd[N]:pipe:[INO]",
                       help="as criu's: the tree's pipe pipe:[INO] (its id in the images, `pycr show files`) "
                            "is the pipe of pycr's fd N, so an end whose other end was outside the tree "
                            "(a `prog | cat` whose cat is not dumped) meets a new reader or writer instead of "
                            "SIGPIPE or EOF once pycr exits; repeat it for more pipes")
        return
    p.add_argument("--tcp-established", action="store_true",
                   help="take established TCP connections (TCP repair); without it a dump refuses them")
    p.add_argument("--ext-unix-sk", action="store_true",
                   help="a unix socket whose peer is outside the tree is taken and reconnected to that peer")
    p.add_argument("-j", "--shell-job", action="store_true",
                   help="the tree runs on the terminal it was started from (restore: on pycr's terminal)")
    p.add_argument("--file-locks", action="store_true", help="take flock and POSIX file locks")


def _add_tls_options(p):
    """criu's TLS options, for a command that opens or accepts a pycr connection (pycr/net/tls.py)."""
    p.add_argument("--tls", action="store_true",
                   help="mutual TLS (1.3 at least) around the whole connection: each side presents its "
                        "certificate and checks the peer's against the CA; the --secret-file challenge still "
                        "runs inside it. Both sides need it. Files not given are criu's: "
                        f"{_tls_paths()}")
    p.add_argument("--tls-cert", metavar="FILE", help="this side's certificate (PEM); implies --tls")
    p.add_argument("--tls-key", metavar="FILE",
                   help="its private key (PEM, unencrypted, mode 0600); implies --tls")
    p.add_argument("--tls-cacert", "--tls-ca", dest="tls_cacert", metavar="FILE",
                   help="the CA certificate (PEM) that must have signed the peer's certificate; only it is "
                        "trusted, never the system's CAs; implies --tls")
    p.add_argument("--tls-cacrl", metavar="FILE",
                   help="that CA's certificate revocation list (PEM): a revoked peer certificate is refused "
                        f"(without it, criu's {_criu_crl()} if present, with criu's CA file only); implies --tls")
    p.add_argument("--tls-no-cn-verify", action="store_true",
                   help="the side that connects does not check that the listener's certificate names the host "
                        "it connected to (the CA check stays); implies --tls")


def _criu_crl():
    from . import net
    return net.CRIU_TLS_CACRL


def _tls_paths():
    from . import net
    return f"--tls-cert {net.CRIU_TLS_CERT}, --tls-key {net.CRIU_TLS_KEY}, --tls-cacert {net.CRIU_TLS_CACERT}"


_TLS_OPTIONS = (("--tls", "tls"), ("--tls-cert", "tls_cert"), ("--tls-key", "tls_key"),
                ("--tls-cacert", "tls_cacert"), ("--tls-cacrl", "tls_cacrl"),
                ("--tls-no-cn-verify", "tls_no_cn_verify"))


def _tls_given(args):
    """The TLS options given on the command line, by name."""
    return [name for name, attr in _TLS_OPTIONS if getattr(args, attr, None) not in (None, False)]


def _credentials(args):
    """The secret file's bytes and, if any TLS option was given, the certificates: read and checked
    now, before anything is connected or frozen (auth.Credentials)."""
    from .net import auth, tls
    config = None
    if _tls_given(args):
        config = tls.load(args.tls_cert, args.tls_key, args.tls_cacert, args.tls_cacrl, args.tls_no_cn_verify)
    return auth.credentials(args.secret_file, config)


def _add_dump_args(p):
    p.add_argument("-t", "--tree", type=_positive_int, required=True, metavar="PID",
                   help="root of the process tree to checkpoint")
    p.add_argument("-D", "--images-dir", required=True, metavar="DIR", help="where to write the images")
    p.add_argument("--prev-images-dir", metavar="DIR",
                   help="the previous pre-dump of this tree (relative to DIR, as criu takes it, or absolute)")
    p.add_argument("--tracker", choices=["auto", "uffd-wp", "soft-dirty", "hash"], default="auto",
                   help="how pages written since the previous pass are found")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the image set DIR holds (default: refuse a directory that holds one)")
    p.add_argument("--track-mem", action="store_true",
                   help="accepted as criu takes it; changes nothing: pycr always tracks what a pass copied, "
                        "so the next pass (--prev-images-dir) copies only what changed")
    p.add_argument("--ghost-limit", type=_size, metavar="SIZE",
                   help="as criu's: the largest file deleted while open or mapped that a dump saves with the "
                        "images (K, M, G suffixes; default 64M, or PYCR_GHOST_LIMIT)")
    g = p.add_argument_group("page server (criu's): the pages files go to `pycr page-server` at ADDR:PORT; "
                             "the other images stay in DIR")
    g.add_argument("--page-server", action="store_true", help="send the pages files to a page server")
    g.add_argument("--address", metavar="ADDR", help="the page server's host name or address")
    g.add_argument("--port", type=_port, metavar="PORT", help="the page server's port")
    g.add_argument("--secret-file", metavar="FILE",
                   help="the secret both sides hold (mode 0600); proves each side to the other")
    _add_tls_options(g)
    _add_display_stats(p)
    _add_object_options(p)
    cliopts.add_output(p)
    _add_common(p)


def _size(text):
    """BYTES with an optional K, M or G suffix (powers of 1024)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = units.get(t[-1:], 1)
    try:
        value = int(float(t[:-1] if t[-1:] in units else t) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 4096, 512K, 2M)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _port(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return value


def _fd(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a file descriptor number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a file descriptor number")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
    return value


def _percent(text):
    value = _positive_float(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"{text!r} is more than 100 %")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line too, like every other pycr error,
    and an option the subcommand does not know points at that subcommand's help."""

    def error(self, message):
        message = message.replace("argument --criu-level: ", "")       # -vN's own words name it
        self.exit(2, f"pycr: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            commands = getattr(self, "commands", {})
            where = commands.get(getattr(parsed, "command", None), self)
            where.error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed


_EXIT_STATUS = """-v (-vN), -q, -o, -D, -W and --display-stats may also come before COMMAND, as criu takes them:
`pycr -v4 -o dump.log dump -t PID -D DIR` is `pycr dump -v4 -o dump.log -t PID -D DIR`.

exit status: 0 success, 1 pycr failed (one line on stderr says why), 2 usage error;
`pycr check -t` exits 3 when it finds something; 128 + N when signal N stopped pycr"""

_RESTORE_EXIT = """exit status: with -d, 0 once the tree runs. Without -d, pycr waits for the restored
root and exits with the root's own status (its exit code, or 128 + the signal that killed it), as a
shell would: a root exiting 1 looks like pycr failing 1. Tell them apart by the summary line
"restored ... runs" (printed unless -q) or by --pidfile: both appear only once the tree runs, and
pycr's own failure comes before them, with one line "pycr: REASON" and no pidfile left.
Otherwise: 1 pycr failed, 2 usage error."""


def build_parser():
    parser = _Parser(
        prog="pycr", description="Checkpoint/restore of live Linux process trees, with incremental migration.",
        epilog=_EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pycr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("check", help="which kernel features pycr can use here; with -t, what a killed "
                                     "pycr left in a tree")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p.add_argument("-t", "--tree", type=_positive_int, metavar="PID",
                   help="list what pycr left in the tree rooted at PID when it was killed")
    _add_common(p)

    p = sub.add_parser("cleanup", help="take out what a killed pycr left in a tree "
                                       "(its userfaultfd, its trampoline)")
    p.add_argument("-t", "--tree", type=_positive_int, required=True, metavar="PID", help="root of the tree")
    _add_common(p)

    p = sub.add_parser("dump", help="checkpoint a process tree into image files")
    _add_dump_args(p)
    p.add_argument("-R", "--leave-running", action="store_true",
                   help="let the tree go on after the dump (default: kill it, as criu does)")
    p.add_argument("--lazy-pages", action="store_true",
                   help="post-copy to another host (criu's): write every image but the anonymous pages, keep "
                        "the tree frozen and serve those pages on --address/--port to `pycr lazy-pages "
                        "--page-server`; the tree is killed once all have moved, thawed if the "
                        "destination goes away before its replica runs")

    p = sub.add_parser("pre-dump", help="copy memory while the tree runs; later passes copy what changed")
    _add_dump_args(p)
    p.add_argument("-R", "--leave-running", action="store_true",
                   help="accepted as criu takes it; changes nothing: a pre-dump always leaves the tree running")

    p = sub.add_parser("restore", help="bring a dumped tree back with its PIDs, memory and registers",
                       epilog=_RESTORE_EXIT, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-D", "--images-dir", required=True, metavar="DIR", help="the image set to restore")
    p.add_argument("-d", "--restore-detached", action="store_true",
                   help="return once the tree runs instead of waiting for its root task")
    p.add_argument("--pidns", action="store_true",
                   help="restore into a new PID namespace (when the original PIDs are taken)")
    p.add_argument("--follow", action="store_true",
                   help="incremental restore: DIR receives pass directories one by one (pre-dumps, then a "
                        "dump); build the tree from the first, keep it stopped, apply each pass as it "
                        "comes, and resume it on the dump")
    p.add_argument("--follow-timeout", type=_positive_float, default=300.0, metavar="SECONDS",
                   help="with --follow: give up if no next pass appears within this time (default 300)")
    p.add_argument("--lazy-pages", action="store_true",
                   help="post-copy: start the tree without its anonymous memory; `pycr lazy-pages` (started "
                        "first, same -D/-W) serves each page on first touch and pushes the rest")
    _add_display_stats(p)
    _add_object_options(p, restore=True)
    p.add_argument("--trust-images", action="store_true",
                   help="restore images that another user owns or may write (default: refuse them); "
                        "images a non-root user owns still get no more than that user's rights")
    p.add_argument("--pidfile", metavar="FILE",
                   help="write the restored root's PID (as pycr sees it: outside a --pidns namespace) to "
                        "FILE, relative to the work directory, once the tree runs; FILE must not exist")
    cliopts.add_output(p, written="-o, --pidfile and the socket of --lazy-pages are")
    _add_common(p)

    p = sub.add_parser("lazy-pages", help="serve the pages of a `restore --lazy-pages` on fault, then exit "
                                          "once every page is placed")
    p.add_argument("-D", "--images-dir", required=True, metavar="DIR", help="the image set being restored")
    g = p.add_argument_group("remote (criu's): the pages come from `pycr dump --lazy-pages` at ADDR:PORT")
    g.add_argument("--page-server", action="store_true", help="fetch the pages from a lazy dump's source")
    g.add_argument("--address", metavar="ADDR", help="the source's host name or address")
    g.add_argument("--port", type=_port, metavar="PORT", help="the source's port")
    g.add_argument("--secret-file", metavar="FILE", help="the secret both sides hold (mode 0600)")
    _add_tls_options(g)
    _add_daemon_options(p)
    cliopts.add_output(p, written="-o and the socket `restore --lazy-pages` connects to are")
    _add_common(p)

    p = sub.add_parser("migrate", help="move a live tree into a replica (on this machine, or with --to on "
                                       "another host's `pycr serve`) with iterative pre-dumps and incremental "
                                       "restore")
    p.add_argument("-t", "--tree", type=_positive_int, required=True, metavar="PID", help="root of the tree to move")
    p.add_argument("-W", "--work-dir", metavar="DIR",
                   help="keep the image sets of every pass here, and -o's log when relative "
                        "(default: a temporary directory, removed at the end; -o then relative to here)")
    p.add_argument("--max-passes", type=_positive_int, default=8, metavar="N",
                   help="passes at most, the final dump included (default 8)")
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--min-delta", type=_size, default=1 << 20, metavar="BYTES",
                      help="take the final dump once a pass copied at most this much (K, M, G suffixes; "
                           "default 1M)")
    stop.add_argument("--threshold", type=_percent, metavar="PERCENT",
                      help="take the final dump once a pass copied at most PERCENT %% of the first pass")
    p.add_argument("--tracker", choices=["auto", "uffd-wp", "soft-dirty", "hash"], default="auto",
                   help="how pages written since the previous pass are found")
    p.add_argument("--to", metavar="HOST:PORT",
                   help="migrate to `pycr serve` on another host (default: a replica on this machine)")
    p.add_argument("--secret-file", metavar="FILE",
                   help="with --to: the secret both sides hold (mode 0600)")
    _add_tls_options(p.add_argument_group("TLS, with --to (criu's options)"))
    p.add_argument("--downtime-limit", type=_positive_float, metavar="MS",
                   help="switch over once the expected downtime (the final pass's fixed cost, measured on the "
                        "pre-dumps, plus what remains over the measured bandwidth) is at most MS milliseconds; "
                        "throttle the tree's CPU if it dirties memory too fast (default: the --min-delta rules)")
    p.add_argument("--bandwidth-limit", type=_size, metavar="RATE",
                   help="pace every pass's copy to at most RATE bytes per second (K, M, G suffixes), "
                        "as a slower link would")
    p.add_argument("--abort-over-budget", action="store_true",
                   help="with --downtime-limit: if the budget cannot be met by --max-passes, stop and leave "
                        "the tree running (default: take the final dump anyway and say by how much it missed)")
    p.add_argument("--mode", choices=["pre-copy", "post-copy", "hybrid"], default="pre-copy",
                   help="with --to: pre-copy (passes while the tree runs, then a final dump; default), post-copy "
                        "(one short freeze without the anonymous memory, which the running replica gets on "
                        "fault), or hybrid (pre-copy passes, then the pages dirtied since the last one on fault)")
    _add_object_options(p)
    cliopts.add_output(p, work_dir=False)
    _add_common(p)

    p = sub.add_parser("serve", help="wait for migrations from `pycr migrate --to` and run each replica")
    p.add_argument("--listen", required=True, metavar="ADDR:PORT",
                   help="address and TCP port to listen on (port 0: any free port; the one taken is printed)")
    p.add_argument("--secret-file", required=True, metavar="FILE",
                   help="the secret both sides hold (mode 0600); a peer that cannot prove it holds it is "
                        "dropped before anything it sends is read")
    _add_tls_options(p.add_argument_group("TLS (criu's options)"))
    p.add_argument("-W", "--work-dir", metavar="DIR",
                   help="where each pass's image set is received (its processes' pages go into the replica as "
                        "they arrive, a copy here; default: the temporary directory); removed once the "
                        "migration ends")
    p.add_argument("--host-pids", action="store_true",
                   help="run the replica with its original PIDs on this host, not in a new PID namespace "
                        "(they must be free here)")
    p.add_argument("--once", action="store_true", help="serve one migration, then exit (1 if it failed)")
    cliopts.add_output(p, work_dir=False)
    _add_common(p)

    p = sub.add_parser("page-server", help="receive the pages files of one dump or pre-dump "
                                           "(`pycr dump --page-server`) into a directory, then exit")
    p.add_argument("-D", "--images-dir", required=True, metavar="DIR",
                   help="where the pages files are written (made if missing; must hold none yet)")
    p.add_argument("--port", type=_port, required=True, metavar="PORT",
                   help="TCP port to listen on (0: any free port; the one taken is printed)")
    p.add_argument("--address", default="", metavar="ADDR",
                   help="address to listen on (default: every address, as criu's)")
    p.add_argument("--secret-file", required=True, metavar="FILE",
                   help="the secret both sides hold (mode 0600); a peer that cannot prove it holds it "
                        "is dropped before anything it sends is written")
    _add_tls_options(p.add_argument_group("TLS (criu's options)"))
    _add_daemon_options(p)
    cliopts.add_output(p)
    _add_common(p)

    p = sub.add_parser("show", help="decode images into readable text or JSON; --dirty-map: which pages each "
                                    "pass of a chain saved")
    p.add_argument("path", nargs="?", help="an images directory or one image file")
    p.add_argument("--json", action="store_true", help="print JSON that `pycr encode` turns back into the same bytes")
    p.add_argument("--dirty-map", metavar="DIR",
                   help="which pages of each process every pass saved: DIR is the last image set of a pre-dump "
                        "chain or a directory of pass sets (`pycr migrate -W DIR`); a text summary, or with -o "
                        "a picture (needs matplotlib: pip install 'pycr[plot]')")
    p.add_argument("-o", "--output", metavar="PNG", help="with --dirty-map: draw the map into this file")
    _add_common(p)

    p = sub.add_parser("encode", help="turn the JSON of one image (from `pycr show FILE --json`) back into its bytes")
    p.add_argument("-i", "--input", required=True, metavar="JSON", help="JSON file, or - for stdin")
    p.add_argument("-o", "--output", required=True, metavar="IMG")
    _add_common(p)
    parser.commands = sub.choices
    return parser


def _usage_mistake(args):
    """What is wrong with this combination of options (a usage error: exit 2, as argparse's own), or
    None. Checked before anything is opened, frozen or made."""
    cmd = args.command
    if cmd in ("dump", "pre-dump", "lazy-pages"):
        given = [o for o, v in (("--address", args.address), ("--port", args.port),
                                ("--secret-file", args.secret_file)) if v is not None] + _tls_given(args)
        if getattr(args, "lazy_pages", False):
            missing = [o for o in ("--address", "--port", "--secret-file") if o not in given]
            if missing:
                return f"--lazy-pages needs {', '.join(missing)}"
            if args.page_server or args.leave_running or args.prev_images_dir:
                return ("--lazy-pages serves the pages itself; it does not go with --page-server, "
                        "--leave-running or --prev-images-dir")
        elif args.page_server:
            missing = [o for o in ("--address", "--port", "--secret-file") if o not in given]
            if missing:
                return f"--page-server needs {', '.join(missing)}"
        elif given:
            return f"{given[0]} is for --page-server, which was not given"
    if cmd == "restore" and args.follow and args.lazy_pages:
        return "--lazy-pages restores one image set; it does not go with --follow"
    if cmd == "migrate":
        if args.mode != "pre-copy" and not args.to:
            return "--mode post-copy and hybrid migrate to another host: give --to and --secret-file"
        if bool(args.to) != bool(args.secret_file):
            return "--to and --secret-file go together"
        if _tls_given(args) and not args.to:
            return f"{_tls_given(args)[0]} is for --to, which was not given"
        if args.to and (_host_port(args.to) is None or not _host_port(args.to)[0]):
            return f"--to {args.to}: give it as HOST:PORT"
        if args.abort_over_budget and args.downtime_limit is None:
            return "--abort-over-budget needs --downtime-limit"
        if args.bandwidth_limit == 0:
            return "--bandwidth-limit must be more than 0"
    if cmd == "serve" and _host_port(args.listen, port_zero=True) is None:
        return f"--listen {args.listen}: give it as ADDR:PORT"
    if cmd == "show":
        if args.dirty_map is not None and (args.path is not None or args.json):
            return "--dirty-map takes no other path and no --json"
        if args.dirty_map is None and args.path is None:
            return "give an images directory or image file, or --dirty-map DIR"
        if args.dirty_map is None and args.output is not None:
            return "-o draws only with --dirty-map"
        if args.output is not None:
            from .dirtymap_draw import format_mistake
            return format_mistake(args.output)
    return None


def _host_port(text, port_zero=False):
    """(host, port) of HOST:PORT ([v6]:PORT too), or None when it is not one."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not (0 if port_zero else 1) <= int(port) <= 65535:
        return None
    return host.strip("[]"), int(port)


def _run(args):
    if args.command == "check" and args.tree is not None:
        return _check_tree(args.tree)
    if args.command == "check":
        from .check import run_check
        return run_check(as_json=args.json)
    if args.command == "cleanup":
        from .leftovers import cleanup
        removed = cleanup(args.tree)
        for item in removed:
            print(f"removed {item}")
        if not removed:
            print(f"nothing of pycr's in the tree of pid {args.tree}")
        return 0
    if args.command in ("dump", "pre-dump"):
        return _dump(args)
    if args.command == "page-server":
        return _page_server(args)
    if args.command == "restore" and args.follow:
        return _restore_follow(args)
    if args.command == "restore":
        return _restore(args)
    if args.command == "lazy-pages":
        return _lazy_pages(args)
    if args.command == "migrate" and (args.to or args.secret_file):
        return _migrate_to(args)
    if args.command == "migrate":
        return _migrate(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "show" and args.dirty_map is not None:
        return _dirty_map(args)
    if args.command == "show":
        from .show import show
        show(args.path, json=args.json)
        return 0
    if args.command == "encode":
        from .images import encode_json_file
        encode_json_file(args.input, args.output)
        return 0
    raise AssertionError(args.command)


def _dirty_map(args):
    from . import dirtymap
    if args.output is not None:
        from .dirtymap_draw import draw, require_matplotlib
        require_matplotlib()                # before reading the chain: fail in one line, at once
        dmap = dirtymap.load(args.dirty_map)
        drawn = len(draw(dmap, args.output).panels)
        left = len(dmap.processes) - drawn
        print(f"{args.output}: dirty map of {len(dmap.passes)} passes, {drawn} processes"
              + (f" ({left} smaller ones left out)" if left else ""))
        return 0
    sys.stdout.write(dirtymap.text(dirtymap.load(args.dirty_map)))
    return 0


def _check_tree(root):
    from . import proc
    from .leftovers import find
    proc.status(root)                      # TaskGone: one line, exit 1
    found = find(root)
    for item in found:
        print(item)
    if not found:
        print(f"nothing of pycr's in the tree of pid {root}")
        return 0
    print(f"run `pycr cleanup -t {root}` to take them out")
    return 3


def _dump(args):
    with stats.phase("imports"):
        from .dump import DumpStats, dump_tree
    if getattr(args, "ghost_limit", None):
        import os
        os.environ["PYCR_GHOST_LIMIT"] = str(args.ghost_limit)     # read where deleted files are taken
    dumped = DumpStats()
    leave_running = getattr(args, "leave_running", False)
    if getattr(args, "lazy_pages", False):
        return _lazy_dump(args)
    sink = _page_server_client(args)
    try:
        dump_tree(args.tree, args.images_dir, pre_dump=(args.command == "pre-dump"),
                  leave_running=leave_running, prev_images_dir=args.prev_images_dir, tracker=args.tracker,
                  overwrite=args.overwrite, stats=dumped, pages_sink=sink)
    except PycrError as exc:
        if sink is not None and sink.lost(exc):     # the tree was thawed before the dump gave up
            raise type(exc)(f"{exc}; the {args.command} failed, the tree goes on as it was") from None
        raise
    finally:
        if sink is not None:
            sink.abort()            # closes; asks the server to drop its files unless the dump committed
    line = cliopts.dump_summary(args.command, dumped, args.images_dir, leave_running)
    if sink is not None:
        line += f"; pages files ({sink.files}) at the page server {sink.name.split()[-1]}"
    _summary(args, line)
    return 0


def _lazy_dump(args):
    from .lazy.remote_source import lazy_dump
    job = lazy_dump(args.tree, args.images_dir, args.address, args.port, _credentials(args),
                    overwrite=args.overwrite,
                    on_listening=lambda where: print(f"pycr dump: images in {args.images_dir}; serving lazy pages on "
                                                    f"{where}", flush=True))
    _summary(args, f"dump: lazy, {job.sent / (1 << 20):.1f} MiB of pages sent to the replica; tree frozen "
                   f"{job.stats.frozen_seconds:.3f} s, then killed; images in {args.images_dir}")
    return 0


def _page_server_client(args):
    """The connected, authenticated page server of --page-server, or None (before anything is frozen)."""
    if not args.page_server:
        return None
    from .net.page_client import PageServerClient
    return PageServerClient.connect(args.address, args.port, _credentials(args))


def _add_daemon_options(p):
    """criu's options of a server that listens (page-server, lazy-pages)."""
    p.add_argument("--daemon", action="store_true",
                   help="go to the background once listening (the line printed then names its PID)")
    p.add_argument("--status-fd", type=_fd, metavar="FD",
                   help="write one NUL byte to FD once listening, then close it (as criu does)")


def _go_background(args, name):
    """--daemon, before the server makes anything (a socket, a thread, the lazy-pages watchdog): fork.
    The child serves in a session of its own, stdin and stdout on /dev/null and stderr on a pipe to
    the parent (a helper it forks must not hold the caller's stdio open). The parent passes on what
    the child says on stderr until it listens (_listening), then prints the line naming its PID and
    exits 0; if the child fails before, it exits with the child's status.
    -> that status in the parent, None in the server."""
    import os
    import select
    if not args.daemon:
        return None
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.close(err_r)
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(err_w, 2)
        os.close(null)
        os.close(err_w)
        args.ready_fd = ready_w
        return None
    os.close(ready_w)
    os.close(err_w)
    # a line on ready_r: listening (a helper the child forked may hold the pipe open: no EOF to wait for)
    where, watched = b"", [ready_r, err_r]
    try:
        while not where.endswith(b"\n") and (ready_r in watched or err_r in watched):
            for fd in select.select(watched, [], [])[0]:
                data = os.read(fd, 65536)
                if fd == err_r and data:
                    sys.stderr.buffer.write(data)
                    sys.stderr.flush()
                elif data:
                    where += data
                else:
                    watched.remove(fd)
        if where.endswith(b"\n"):
            print(f"pycr {name}: listening on {where[:-1].decode(errors='replace')} (pid {pid})", flush=True)
            return 0
        _, status = os.waitpid(pid, 0)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        raise
    finally:
        os.close(ready_r)
        os.close(err_r)
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code or 1


def _listening(args, name, where):
    """The server listens at `where`: one line on stdout (with --daemon the parent prints it, naming
    this PID, and stdio goes to /dev/null), then --status-fd's NUL byte."""
    import os
    ready = getattr(args, "ready_fd", None)
    if ready is not None:
        os.write(ready, where.encode() + b"\n")
        os.close(ready)
        args.ready_fd = None
        _to_dev_null()
    else:
        print(f"pycr {name}: listening on {where}", flush=True)
    if args.status_fd is not None:
        try:
            os.write(args.status_fd, b"\0")
            os.close(args.status_fd)
        except OSError as exc:
            raise PycrError(f"--status-fd {args.status_fd}: {exc.strerror}") from None


def _page_server(args):
    from .net import channel, page_server
    creds = _credentials(args)
    page_server.check_directory(args.images_dir)
    status = _go_background(args, "page-server")
    if status is not None:
        return status
    listener = channel.listen(args.address, args.port)
    _listening(args, "page-server", channel.describe(listener.getsockname()))
    got = page_server.serve(listener, args.images_dir, creds)
    _summary(args, f"page-server: {got.files} pages files, {got.bytes / (1 << 20):.1f} MiB from "
                   f"{got.peer} in {got.directory}")
    return 0


def _to_dev_null():
    """A daemon's stdio: nothing to print to (-o still logs)."""
    import os
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _summary(args, line):
    if not args.quiet:
        print(line, flush=True)
    pycr_log.to_file_only(line)


def _pidfile(args):
    return cliopts.PidFile(cliopts.in_work_dir(args, args.pidfile)) if args.pidfile else None


def _restore(args):
    with stats.phase("imports"):
        from .restore import restore
    pidfile = _pidfile(args)

    def running(run, seconds):
        if pidfile:
            pidfile.fill(run.tasks[run.images.root.pid].real)
        _summary(args, cliopts.restore_summary(run, args.images_dir, seconds))

    try:
        return restore(args.images_dir, detach=args.restore_detached, pidns=args.pidns,
                       trust_images=args.trust_images, on_running=running,
                       lazy_pages=cliopts.work_dir(args) if args.lazy_pages else None)
    finally:
        if pidfile:
            pidfile.discard()


def _lazy_pages(args):
    from .lazy.daemon import lazy_pages
    remote = (args.address, args.port, _credentials(args)) if args.page_server else None
    status = _go_background(args, "lazy-pages")
    if status is not None:
        return status
    summary = lazy_pages(args.images_dir, cliopts.work_dir(args), page_server=remote,
                         on_listening=lambda path: _listening(args, "lazy-pages", path))
    _summary(args, summary.line())
    return 0


def _restore_follow(args):
    import time
    from .migrate import DirectoryTransport, follow
    pidfile = _pidfile(args)
    started = time.monotonic()
    try:
        result = follow(DirectoryTransport(args.images_dir, timeout=args.follow_timeout), pidns=args.pidns,
                        trust_images=args.trust_images)
        run = result.replica.run
        if pidfile:
            pidfile.fill(run.tasks[run.images.root.pid].real)
    finally:
        if pidfile:
            pidfile.discard()
    _summary(args, cliopts.restore_summary(run, args.images_dir, time.monotonic() - started))
    if args.restore_detached:
        return 0
    return run.wait_root()


def _policy(args):
    """When a migration takes its final dump, and how it paces and throttles (local or --to)."""
    from .migrate.loop import Policy
    return Policy(max_passes=args.max_passes, min_delta=args.min_delta, threshold=args.threshold,
                  downtime_limit=None if args.downtime_limit is None else args.downtime_limit / 1000,
                  bandwidth_limit=args.bandwidth_limit, give_up=args.abort_over_budget)


def _migrate(args):
    from .migrate import migrate
    policy = _policy(args)

    def show(rep, _replica):
        _summary(args, rep.line())

    result = migrate(args.tree, work_dir=args.work_dir, policy=policy, tracker=args.tracker, on_pass=show)
    for line in result.summary.lines():
        _summary(args, line)
    return 0


def _migrate_to(args):
    from .net.migrate_source import migrate_to
    policy = _policy(args)
    creds = _credentials(args)
    result = migrate_to(args.tree, args.to, creds, policy=policy, tracker=args.tracker, work_dir=args.work_dir,
                        on_pass=lambda rep: _summary(args, rep.line()), mode=args.mode)
    for line in result.lines():
        _summary(args, line)
    return 0


def _serve(args):
    from .net import channel
    from .net.serve import serve
    creds = _credentials(args)
    host, port = _host_port(args.listen, port_zero=True)
    listener = channel.listen(host, port)
    print(f"pycr serve: listening on {channel.describe(listener.getsockname())}", flush=True)

    def done(got):
        from .net.greeter import Refused
        if isinstance(got, Refused):
            _fail(f"pycr: serve: refused {got}; still listening")
        elif isinstance(got, PycrError):
            _fail(f"pycr: serve: migration failed, the replica was discarded: {got}; still listening")
        else:
            _summary(args, got.line())

    serve(listener, creds, args.work_dir, pidns=not args.host_pids, once=args.once, on_done=done)
    return 0


_UNDONE = {
    "dump": "the tree was released as it was",
    "pre-dump": "the tree was released as it was",
    "restore": "the tasks it had created were killed",
    "migrate": "the source tree goes on; the replica was killed",
    "page-server": "the files it had received were removed",
    "serve": "the migration in progress was abandoned and its replica discarded",
}


def _raise_interrupted(signum, _frame):
    raise Interrupted(signum)


def _catch_stop_signals():
    """SIGINT, SIGTERM and SIGHUP raise Interrupted, so that pycr rolls back
    (detaches, kills what it created) before it exits."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupted)


def main(argv=None):
    entered = time.perf_counter()
    try:
        _catch_stop_signals()
        parser = build_parser()
        args = parser.parse_args(cliopts.global_options(cliopts.criu_levels(sys.argv[1:] if argv is None else argv),
                                                        parser.commands))
        mistake = _usage_mistake(args)
        if mistake:
            parser.commands[args.command].error(mistake)
    except KeyboardInterrupt:
        print("pycr: interrupted before it began", file=sys.stderr)
        return 130
    verbosity = cliopts.verbosity(args)
    try:
        log_file = _open_log(args)
    except PycrError as exc:
        print(f"pycr: {exc}", file=sys.stderr)
        return 1
    try:
        pycr_log.setup(verbosity, log_file, verbosity if cliopts.chosen(args) else 1)
        progress.allow(not getattr(args, "quiet", False))
        return _main(args, verbosity, entered)
    finally:
        if log_file is not None:
            pycr_log.setup(verbosity)
            log_file.close()


def _open_log(args):
    """-o FILE, opened (truncated, as criu does) before anything else: the whole narration goes in."""
    path = cliopts.log_file_path(args)
    if path is None:
        return None
    try:
        return open(path, "w", buffering=1)
    except OSError as exc:
        raise PycrError(f"{path}: cannot write the log file: {exc.strerror}") from None


def _fail(line):
    print(line, file=sys.stderr)
    pycr_log.to_file_only(line)


def _main(args, verbosity, entered):
    steps.begin(args.command)
    try:
        with options.using(options.from_args(args)):
            if getattr(args, "display_stats", False):
                with stats.collecting(args.command, started=entered, since_process_start=True) as st:
                    status = _run(args)
                print(st.format(), flush=True)
            else:
                status = _run(args)
    except PycrError as exc:
        _fail(f"pycr: {exc}")
        return 1
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        name = signal.Signals(signum).name
        if steps.finished:
            where = f"; the images in {args.images_dir} are whole" if args.command in ("dump", "pre-dump") else ""
            left = f"; {steps.outcome}" if steps.outcome else ""
            _fail(f"pycr: {name} after the {args.command} was complete: nothing was undone{where}{left}")
        else:
            undone = _UNDONE.get(args.command)
            _fail(f"pycr: interrupted by {name}" + (f": {undone}" if undone else ""))
        return 128 + signum
    except BrokenPipeError:
        return 1
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            _fail(f"pycr: no space left on device{': ' + exc.filename if exc.filename else ''}")
        else:
            _fail(f"pycr: {exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}")
        if verbosity >= 2:
            raise
        return 1
    except Exception as exc:  # a bug: still one line unless -vv asks for the traceback; 2 is for usage only
        if verbosity >= 2:
            raise
        _fail(f"pycr: internal error: {type(exc).__name__}: {exc} (run with -vv for the traceback)")
        return 1
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
