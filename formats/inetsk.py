"""inetsk.img: every TCP and UDP socket (IPv4, IPv6) of the tree, with its options and TCP repair state."""

import socket

from construct import Flag, Struct

from .common import U32, U64, Array32, Blob

MAGIC = b"PYCN"
FILE_NAME = "inetsk.img"

Address = Struct(
    "addr" / Blob,              # 4 bytes (AF_INET) or 16 (AF_INET6), network order
    "port" / U32,               # 0: none (not bound, not connected)
    "scope_id" / U32,           # IPv6 scope (interface index) of a link-local address, else 0
)

Option = Struct(
    "level" / U32,              # SOL_SOCKET, IPPROTO_TCP, IPPROTO_IP, IPPROTO_IPV6
    "name" / U32,               # one of OPTIONS below
    "value" / Blob,             # as getsockopt gave it
)

Tcp = Struct(
    "inq_seq" / U32,            # rcv_nxt (TCP_QUEUE_SEQ of the receive queue)
    "outq_seq" / U32,           # write_seq (TCP_QUEUE_SEQ of the send queue)
    "recv_data" / Blob,         # received, not yet read by the program
    "send_data" / Blob,         # written, not yet acknowledged by the peer
    "unsent" / U32,             # the tail of send_data that was never sent (SIOCOUTQNSD)
    "mss_clamp" / U32,          # TCP_MAXSEG
    "options" / U32,            # TCPI_OPT_* from TCP_INFO: 1 timestamps, 2 SACK, 4 window scaling
    "snd_wscale" / U32,
    "rcv_wscale" / U32,
    "timestamp" / U32,          # TCP_TIMESTAMP (current TSval) if timestamps are on
    "snd_wl1" / U32,            # TCP_REPAIR_WINDOW
    "snd_wnd" / U32,
    "max_window" / U32,
    "rcv_wnd" / U32,
    "rcv_wup" / U32,
)

Socket = Struct(
    "file_id" / U32,            # the open file description, as in files.img
    "inode" / U64,              # the socket's inode (sockfs) at dump time
    "family" / U32,             # AF_INET 2, AF_INET6 10
    "type" / U32,               # SOCK_STREAM 1, SOCK_DGRAM 2
    "protocol" / U32,           # IPPROTO_TCP 6, IPPROTO_UDP 17
    "state" / U32,              # TCP state (include/net/tcp_states.h); UDP: 1 connected, 7 not
    "handover" / Flag,          # migrate on one host: the replica takes the source's own socket
    "local" / Address,
    "peer" / Address,
    "backlog" / U32,            # listen() backlog of a listener, else 0
    "options" / Array32(Option),
    "tcp" / Array32(Tcp),       # one entry for an ESTABLISHED connection, else none
)

Body = Struct(
    "sockets" / Array32(Socket),
)

SOL_SOCKET, TCP, IP, IPV6 = socket.SOL_SOCKET, socket.IPPROTO_TCP, socket.IPPROTO_IP, socket.IPPROTO_IPV6

#: The options an image may carry: (level, name) -> (name, families, types, value size).
#: A dump asks only those that apply to the socket's family and type (never SO_PASSCRED, which
#: Linux 6.18 refuses on an inet socket), keeps those that differ from a new socket's, and a
#: restore sets nothing else.
OPTIONS = {
    (SOL_SOCKET, socket.SO_REUSEADDR): ("SO_REUSEADDR", "46", "su", 4),
    (SOL_SOCKET, socket.SO_REUSEPORT): ("SO_REUSEPORT", "46", "su", 4),
    (SOL_SOCKET, socket.SO_KEEPALIVE): ("SO_KEEPALIVE", "46", "s", 4),
    (SOL_SOCKET, socket.SO_BROADCAST): ("SO_BROADCAST", "46", "u", 4),
    (SOL_SOCKET, socket.SO_SNDBUF): ("SO_SNDBUF", "46", "su", 4),
    (SOL_SOCKET, socket.SO_RCVBUF): ("SO_RCVBUF", "46", "su", 4),
    (SOL_SOCKET, socket.SO_PRIORITY): ("SO_PRIORITY", "46", "su", 4),
    (SOL_SOCKET, socket.SO_RCVLOWAT): ("SO_RCVLOWAT", "46", "su", 4),
    (SOL_SOCKET, socket.SO_OOBINLINE): ("SO_OOBINLINE", "46", "s", 4),
    (SOL_SOCKET, socket.SO_LINGER): ("SO_LINGER", "46", "s", 8),
    (SOL_SOCKET, socket.SO_MARK): ("SO_MARK", "46", "su", 4),
    (SOL_SOCKET, socket.SO_BINDTODEVICE): ("SO_BINDTODEVICE", "46", "su", 16),
    (TCP, socket.TCP_NODELAY): ("TCP_NODELAY", "46", "s", 4),
    (TCP, socket.TCP_CORK): ("TCP_CORK", "46", "s", 4),
    (TCP, socket.TCP_KEEPIDLE): ("TCP_KEEPIDLE", "46", "s", 4),
    (TCP, socket.TCP_KEEPINTVL): ("TCP_KEEPINTVL", "46", "s", 4),
    (TCP, socket.TCP_KEEPCNT): ("TCP_KEEPCNT", "46", "s", 4),
    (TCP, socket.TCP_DEFER_ACCEPT): ("TCP_DEFER_ACCEPT", "46", "s", 4),
    (TCP, socket.TCP_USER_TIMEOUT): ("TCP_USER_TIMEOUT", "46", "s", 4),
    (TCP, socket.TCP_FASTOPEN): ("TCP_FASTOPEN", "46", "s", 4),
    (TCP, socket.TCP_NOTSENT_LOWAT): ("TCP_NOTSENT_LOWAT", "46", "s", 4),
    (TCP, socket.TCP_CONGESTION): ("TCP_CONGESTION", "46", "s", 16),
    (IP, socket.IP_TOS): ("IP_TOS", "4", "su", 4),
    (IP, socket.IP_TTL): ("IP_TTL", "4", "su", 4),
    (IPV6, socket.IPV6_V6ONLY): ("IPV6_V6ONLY", "6", "su", 4),
    (IPV6, socket.IPV6_UNICAST_HOPS): ("IPV6_UNICAST_HOPS", "6", "su", 4),
    (IPV6, socket.IPV6_TCLASS): ("IPV6_TCLASS", "6", "su", 4),
}
