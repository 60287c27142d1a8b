"""unixsk.img: every unix socket of the tree, how it is connected, its options and queued data."""

from construct import Enum, Flag, Int8ul, Int32sl, Struct

from .common import U32, U64, Array32, Blob, String

MAGIC = b"PYCU"
FILE_NAME = "unixsk.img"

SockType = Enum(Int8ul, stream=1, dgram=2, seqpacket=5)
SockState = Enum(Int8ul, established=1, close=7, listen=10)

Message = Struct(
    "sender" / U32,             # inode of the tree's socket that sent it; 0: pycr sends it (see unixsk.md)
    "data" / Blob,              # one datagram or record; for stream, a run of bytes
)

UnixSocket = Struct(
    "file_id" / U32,            # the open file description, as in files.img
    "ino" / U32,                # the socket's inode at dump time (names it in this image)
    "type" / SockType,
    "state" / SockState,
    "name" / Blob,              # bound address: empty, a path (no NUL), or "\0" + abstract name
    "dir" / String,             # a relative path name is relative to this directory; else empty
    "deleted" / Flag,           # the path's socket file was removed after bind
    "mode" / U32,               # socket file's permission bits, uid and gid (path names)
    "uid" / U32,
    "gid" / U32,
    "peer" / U32,               # inode of the connected peer in the tree; 0 none
    "peer_gone" / Flag,         # connected to a peer that was closed since
    "accepted_from" / U32,      # inode of the tree's listener this socket was accepted from; 0
    "ext_peer" / Blob,          # address of a peer outside the tree to connect to again (--ext-unix-sk)
    "backlog" / U32,            # listen() backlog of a listener
    "pending" / Array32(U32),   # a listener's clients waiting to be accepted (their inodes), queue order
    "shutdown" / Int8ul,        # 1 no more receives, 2 no more sends
    "passcred" / Flag,
    "passsec" / Flag,
    "rcvbuf" / U32,             # getsockopt values (SO_RCVBUF/SO_SNDBUF are the doubled ones)
    "sndbuf" / U32,
    "rcvlowat" / U32,
    "rcvtimeo" / U64,           # microseconds, 0 none
    "sndtimeo" / U64,
    "peek_off" / Int32sl,       # SO_PEEK_OFF, -1 unset
    "queue" / Array32(Message), # data queued to be read by this socket, oldest first
)

Body = Struct(
    "sockets" / Array32(UnixSocket),
)
