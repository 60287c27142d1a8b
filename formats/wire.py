"""The wire format of pycr's network channel: a hello, then checksummed frames.

Not an image kind (nothing here is a file): a connection between two pycr
processes (a dump and its page server; a migration source and its
destination) begins with one Hello from each side, then carries Frames.
A frame is a FrameHeader, `length` bytes of payload, and the CRC-32C of
header and payload (FrameTrailer). The payload of each frame type is
declared below (PAYLOADS); DATA carries raw bytes. See wire.md.
"""

import enum

from construct import Bytes, Int8ul, Int16ul, PrefixedArray, Struct

from .common import U32, U64, Blob, String

MAGIC = b"PYCW"
#: Version of the protocol this pycr speaks; a peer with another one is refused.
PROTOCOL_VERSION = 4
NONCE_SIZE = 32
PROOF_SIZE = 32            # HMAC-SHA256
#: Largest payload a reader accepts: a longer `length` is refused before anything is read.
MAX_PAYLOAD = 4 << 20
#: DATA frames are cut at this size by the sender.
DATA_CHUNK = 1 << 20


class Role(enum.IntEnum):
    """What a peer is, said in its hello (and bound into the authentication)."""
    PAGE_CLIENT = 1         # pycr dump / pre-dump --page-server: sends pages files
    PAGE_SERVER = 2         # pycr page-server: writes them into its directory
    MIGRATE_SOURCE = 3      # pycr migrate --to: sends a tree's image sets, pass by pass
    MIGRATE_DEST = 4        # pycr serve: builds the replica from them and runs it
    # 0x40-0x4f: remote lazy restore (post-copy)
    LAZY_SOURCE = 0x40      # pycr dump --lazy-pages: holds the frozen tree, serves its pages
    LAZY_DAEMON = 0x41      # pycr lazy-pages --page-server: fetches them for a lazy restore


class FrameType(enum.IntEnum):
    CHALLENGE = 1           # server -> client: its nonce
    AUTH = 2                # client -> server: its nonce and its proof
    PROOF = 3               # server -> client: its proof
    ERROR = 4               # either way: why the sender gives up (then it closes)
    FILE_BEGIN = 10         # client: a pages file starts
    DATA = 11               # client: the next bytes of the current file
    TRUNCATE = 12           # client: cut the current file back to `offset` (a copy redone)
    FILE_END = 13           # client: the file is complete: its size and CRC-32C per chunk
    FILE_OK = 14            # server: the file is durable under its name and its sums match
    DONE = 15               # client: the dump succeeded, keep every file
    DONE_OK = 16            # server: kept
    ABORT = 17              # client: the dump failed, remove every file of this connection
    FILE_CANCEL = 18        # client: drop the current file (its copy failed; the dump goes on)
    MIGRATION = 20          # source: a migration begins (its ID, the tree's root)
    SET_BEGIN = 21          # source: an image set (one pass) begins
    SET_FILE = 22           # source: one file of the set; `size` bytes of DATA frames follow
    SET_END = 23            # source: the set is complete
    SET_APPLIED = 24        # destination: a pre-dump set was checked and applied to the stopped replica
    READY = 25              # destination: the final set is applied, the replica is complete and stopped
    KILLED = 26             # source: its frozen tree is killed; the replica may run
    RUNNING = 27            # destination: the replica runs
    VERDICT = 28            # source, on a new connection after the link was lost: killed or thawed
    # 29 (LAZY_SOURCE of version 2: a port the destination dialled back to) is retired
    LAZY_DONE = 30          # destination: every lazy page is placed (the fault server's figures)
    SET_HOLE = 31           # source: the current file's next `size` bytes are a hole (read as zeros)
    LAZY_RESUME = 32        # source, on a new connection after the link was lost in post-copy: go on serving
    # 0x40-0x4f: remote lazy restore (source = dump --lazy-pages, daemon = lazy-pages --page-server)
    LAZY_OPEN = 0x40        # daemon: the set it restores, a reconnection or not, the chunks it wants
    LAZY_READY = 0x41       # source: serving; whether the replica already ran (committed)
    PAGE_REQUEST = 0x42     # daemon: a fault waits for this chunk: send it before the stream
    PAGE_CHUNK = 0x43       # source: one chunk of a pages file, read from the frozen task, its CRC-32C
    RESUMING = 0x44         # daemon: the replica is about to run; from the answer on, never thaw
    RESUMING_OK = 0x45      # source: committed (the tree stays stopped until it is killed)
    ALL_PLACED = 0x46       # daemon: every page is in the replica
    TREE_KILLED = 0x47      # source: the source tree is killed; the end
    REPLICA_GONE = 0x48     # daemon: its watchdog killed the replica and saw every task exit: run the tree
    SOURCE_THAWED = 0x49    # source: the tree runs again (it is the one copy); the end


#: Bytes per PAGE_CHUNK (the last chunk of a file is shorter) and per checksum of a lazy source.
LAZY_CHUNK = 256 << 10


Hello = Struct(
    "magic" / Bytes(4),
    "version" / U32,
    "role" / Int8ul,
    "reserved" / Bytes(3),         # must be 0
)
HELLO_SIZE = Hello.sizeof()

FrameHeader = Struct(
    "type" / Int8ul,
    "flags" / Int8ul,          # none defined yet: must be 0
    "reserved" / Int16ul,      # must be 0
    "seq" / U32,               # frames of one direction, counted from 0
    "length" / U32,            # bytes of payload
)
FRAME_HEADER_SIZE = FrameHeader.sizeof()

FrameTrailer = Struct(
    "crc" / U32,               # CRC-32C of header and payload
)
FRAME_TRAILER_SIZE = FrameTrailer.sizeof()

Challenge = Struct("nonce" / Bytes(NONCE_SIZE))
Auth = Struct("nonce" / Bytes(NONCE_SIZE), "proof" / Bytes(PROOF_SIZE))
Proof = Struct("proof" / Bytes(PROOF_SIZE))
Error = Struct("message" / String)
FileBegin = Struct("name" / String)
Truncate = Struct("offset" / U64)
FileEnd = Struct("size" / U64, "chunk_size" / U32, "sums" / Blob)
FileOk = Struct("name" / String)
Empty = Struct()
DoneOk = Struct("files" / U32, "bytes" / U64)
Abort = Struct("reason" / String)
MIGRATION_ID_SIZE = 16
Migration = Struct("id" / Bytes(MIGRATION_ID_SIZE), "root_pid" / U32)
SetBegin = Struct("number" / U32, "name" / String, "final" / Int8ul)
SetFile = Struct("name" / String, "size" / U64)
SetEnd = Struct("files" / U32, "bytes" / U64)
SetApplied = Struct("number" / U32, "added" / U32, "removed" / U32, "recreated" / U32,
                    "apply_us" / U64)
Running = Struct("number" / U32, "added" / U32, "removed" / U32, "recreated" / U32, "apply_us" / U64,
                 "root_pid" / U32, "root_real" / U32, "init_real" / U32)
Verdict = Struct("id" / Bytes(MIGRATION_ID_SIZE), "killed" / Int8ul)
SetHole = Struct("size" / U64)
LazyResume = Struct("id" / Bytes(MIGRATION_ID_SIZE))
LazyDone = Struct("ok" / Int8ul, "faults" / U32, "fault_pages" / U64, "pushed_pages" / U64,
                  "zero_pages" / U64, "seconds_us" / U64, "median_ns" / U64, "p99_ns" / U64,
                  "bytes" / U64, "message" / String)

Wanted = Struct("pid" / U32, "bitmap" / Blob)      # bit i (LSB first): chunk i of pages-<pid>.img
LazyOpen = Struct("set_id" / Bytes(16), "resumed" / Int8ul, "wanted" / PrefixedArray(U32, Wanted))
LazyReady = Struct("chunk_size" / U32, "committed" / Int8ul)
PageRequest = Struct("pid" / U32, "index" / U32)
PageChunk = Struct("pid" / U32, "index" / U32, "crc" / U32, "data" / Blob)

#: The payload schema of each frame type (DATA: raw bytes, no schema).
PAYLOADS = {
    FrameType.CHALLENGE: Challenge,
    FrameType.AUTH: Auth,
    FrameType.PROOF: Proof,
    FrameType.ERROR: Error,
    FrameType.FILE_BEGIN: FileBegin,
    FrameType.DATA: None,
    FrameType.TRUNCATE: Truncate,
    FrameType.FILE_END: FileEnd,
    FrameType.FILE_OK: FileOk,
    FrameType.DONE: Empty,
    FrameType.DONE_OK: DoneOk,
    FrameType.ABORT: Abort,
    FrameType.FILE_CANCEL: FileBegin,
    FrameType.MIGRATION: Migration,
    FrameType.SET_BEGIN: SetBegin,
    FrameType.SET_FILE: SetFile,
    FrameType.SET_END: SetEnd,
    FrameType.SET_APPLIED: SetApplied,
    FrameType.READY: Empty,
    FrameType.KILLED: Empty,
    FrameType.RUNNING: Running,
    FrameType.VERDICT: Verdict,
    FrameType.LAZY_RESUME: LazyResume,
    FrameType.LAZY_DONE: LazyDone,
    FrameType.SET_HOLE: SetHole,
    FrameType.LAZY_OPEN: LazyOpen,
    FrameType.LAZY_READY: LazyReady,
    FrameType.PAGE_REQUEST: PageRequest,
    FrameType.PAGE_CHUNK: PageChunk,
    FrameType.RESUMING: Empty,
    FrameType.RESUMING_OK: Empty,
    FrameType.ALL_PLACED: Empty,
    FrameType.TREE_KILLED: Empty,
    FrameType.REPLICA_GONE: Empty,
    FrameType.SOURCE_THAWED: Empty,
}
