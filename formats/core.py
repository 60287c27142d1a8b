"""core-<pid>.img: per-process kernel state that is not memory or files."""

from construct import Array, Enum, Flag, Int8ul, Struct

from .common import U32, U64, Array32, Blob, Registers, Siginfo, String

MAGIC = b"PYCC"
FILE_NAME = "core-{pid}.img"

SIGNAL_COUNT = 64       # sigactions[i] belongs to signal i + 1

Creds = Struct(
    "uid" / U32, "euid" / U32, "suid" / U32, "fsuid" / U32,
    "gid" / U32, "egid" / U32, "sgid" / U32, "fsgid" / U32,
    "groups" / Array32(U32),
    "cap_inh" / U64, "cap_prm" / U64, "cap_eff" / U64, "cap_bnd" / U64,
    "cap_amb" / U64,
)

Rlimit = Struct(
    "cur" / U64,                # RLIM_INFINITY is 2**64 - 1
    "max" / U64,
)

Sigaction = Struct(
    "handler" / U64,            # SIG_DFL 0, SIG_IGN 1, else an address
    "flags" / U64,              # SA_* bits
    "restorer" / U64,
    "mask" / U64,               # bit n-1 = signal n
)

Rseq = Struct(
    "pointer" / U64,            # 0 when the thread has no rseq area
    "size" / U32,
    "signature" / U32,
)

Sigaltstack = Struct(
    "sp" / U64,                 # ss_sp; 0 with size 0 when none is set
    "flags" / U32,              # ss_flags (SS_ONSTACK, SS_DISABLE, SS_AUTODISARM)
    "size" / U64,               # ss_size
)

Thread = Struct(
    "tid" / U32,
    "comm" / String,            # the thread's own name (/proc/PID/task/TID/comm)
    "regs" / Registers,
    "xstate" / Blob,            # NT_X86_XSTATE regset as read
    "sigmask" / U64,
    "pending" / Array32(Siginfo),   # per-thread queue, oldest first
    "rseq" / Rseq,
    "clear_tid_address" / U64,  # set_tid_address(): futex woken at thread exit (pthread_join)
    "robust_list" / U64,        # set_robust_list() head, 0 if none
    "robust_list_len" / U64,
    "sigaltstack" / Sigaltstack,
)

Itimer = Struct(
    "value_us" / U64,           # time left at the dump, microseconds; 0 = disarmed
    "interval_us" / U64,        # reload value, microseconds; 0 = one-shot
)

ITIMER_COUNT = 3                # ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF

SeccompMode = Enum(Int8ul, disabled=0, strict=1, filter=2)

Body = Struct(
    "pid" / U32,
    "comm" / String,
    "personality" / U32,
    "umask" / U32,
    "cwd" / String,
    "root" / String,
    "no_new_privs" / Flag,
    "creds" / Creds,
    "rlimits" / Array32(Rlimit),            # as many as the dumping kernel has, by RLIMIT_* number
    "sigactions" / Array(SIGNAL_COUNT, Sigaction),
    "shared_pending" / Array32(Siginfo),    # process-wide queue, oldest first
    "seccomp_mode" / SeccompMode,
    "seccomp_filters" / Array32(Blob),      # sock_filter arrays, oldest first
    "xcomp_perm" / U64,         # xstate components granted by ARCH_REQ_XCOMP_PERM (AMX tile data)
    "job_stopped" / Flag,       # stopped by SIGSTOP/SIGTSTP (State T): comes back stopped
    "itimers" / Array(ITIMER_COUNT, Itimer),    # setitimer(): REAL, VIRTUAL, PROF
    "threads" / Array32(Thread),            # leader first
)
