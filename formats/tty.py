"""tty.img: the pseudo-terminals of the tree (both sides), and the terminal of a shell job."""

from construct import Flag, Int8ul, Int16ul, Int32sl, Struct

from .common import U32, Array32, FixedBlob

MAGIC = b"PYCY"
FILE_NAME = "tty.img"

Termios = Struct(               # struct termios2, as TCGETS2 returns it
    "iflag" / U32,
    "oflag" / U32,
    "cflag" / U32,
    "lflag" / U32,
    "line" / Int8ul,
    "cc" / FixedBlob(19),
    "ispeed" / U32,
    "ospeed" / U32,
)

Winsize = Struct("rows" / Int16ul, "cols" / Int16ul, "xpixel" / Int16ul, "ypixel" / Int16ul)

Pty = Struct(
    "index" / U32,              # N of /dev/pts/N
    "inherited" / Flag,         # a shell job's terminal: its master is outside the tree
    "termios" / Termios,
    "winsize" / Winsize,
    "packet" / Flag,            # TIOCPKT on the master
    "locked" / Flag,            # TIOCSPTLCK: the slave cannot be opened
    "exclusive" / Flag,         # TIOCEXCL on the slave
    "other_closed" / Flag,      # every slave was closed: a read of the master gives EIO
    "sid" / U32,                # the session it is the controlling terminal of (0: none)
    "pgrp" / Int32sl,           # its foreground process group (0: none)
)

File = Struct(
    "file_id" / U32,            # the open file description, as in files.img
    "index" / U32,              # the pty it opens
    "master" / Flag,            # /dev/ptmx (type ptmx) or /dev/pts/N (type pts)
)

Body = Struct(
    "ptys" / Array32(Pty),
    "files" / Array32(File),
)
