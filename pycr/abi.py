"""The kernel's x86_64 ABI numbers pycr uses, in one place.

Syscall numbers, wait/clone/open/mmap flags, prctl and arch_prctl codes,
userfaultfd ioctls and features, pagemap bits and PAGEMAP_SCAN categories.
They are ABI and never change; each is written here once, from the kernel's
uapi headers, so that a wrong copy cannot hide elsewhere. ptrace request and
option numbers stay in pycr.ptrace.binding (only ptrace uses them); errno
values come from the errno module. tests/test_abi.py checks this module
against the restore stub (pycr/native/stub.S, core.c), python-ptrace's
syscall table and the constants Python's own modules have.

A top-level module rather than pycr.ptrace.syscalls: native, proc, trackers
and check use these numbers too, and none of them should import ptrace.
python-ptrace's table is a check here, not the source: it maps x32 numbers
(512 and up) onto some x86_64 names and lacks a few pycr needs.
"""

#: Syscall numbers by name (asm/unistd_64.h); call sites pass names where they can.
NR = {
    "read": 0,
    "write": 1,
    "open": 2,
    "close": 3,
    "stat": 4,
    "fstat": 5,
    "lstat": 6,
    "poll": 7,
    "lseek": 8,
    "mmap": 9,
    "mprotect": 10,
    "munmap": 11,
    "brk": 12,
    "rt_sigaction": 13,
    "rt_sigprocmask": 14,
    "rt_sigreturn": 15,
    "ioctl": 16,
    "pread64": 17,
    "pwrite64": 18,
    "readv": 19,
    "writev": 20,
    "access": 21,
    "pipe": 22,
    "sched_yield": 24,
    "mremap": 25,
    "msync": 26,
    "mincore": 27,
    "madvise": 28,
    "shmget": 29,
    "shmat": 30,
    "shmctl": 31,
    "dup": 32,
    "dup2": 33,
    "pause": 34,
    "nanosleep": 35,
    "getitimer": 36,
    "alarm": 37,
    "setitimer": 38,
    "getpid": 39,
    "sendfile": 40,
    "socket": 41,
    "clone": 56,
    "fork": 57,
    "vfork": 58,
    "execve": 59,
    "exit": 60,
    "wait4": 61,
    "kill": 62,
    "uname": 63,
    "fcntl": 72,
    "flock": 73,
    "fsync": 74,
    "ftruncate": 77,
    "getcwd": 79,
    "chdir": 80,
    "fchdir": 81,
    "rename": 82,
    "mkdir": 83,
    "rmdir": 84,
    "unlink": 87,
    "readlink": 89,
    "umask": 95,
    "getrlimit": 97,
    "getrusage": 98,
    "getuid": 102,
    "getgid": 104,
    "setuid": 105,
    "setgid": 106,
    "geteuid": 107,
    "getegid": 108,
    "setpgid": 109,
    "getppid": 110,
    "getpgrp": 111,
    "setsid": 112,
    "setreuid": 113,
    "setregid": 114,
    "getgroups": 115,
    "setgroups": 116,
    "setresuid": 117,
    "getresuid": 118,
    "setresgid": 119,
    "getresgid": 120,
    "getpgid": 121,
    "setfsuid": 122,
    "setfsgid": 123,
    "getsid": 124,
    "capget": 125,
    "capset": 126,
    "rt_sigpending": 127,
    "rt_sigtimedwait": 128,
    "rt_sigqueueinfo": 129,
    "rt_sigsuspend": 130,
    "sigaltstack": 131,
    "personality": 135,
    "mlock": 149,
    "munlock": 150,
    "mlockall": 151,
    "munlockall": 152,
    "prctl": 157,
    "arch_prctl": 158,
    "setrlimit": 160,
    "chroot": 161,
    "gettid": 186,
    "tkill": 200,
    "futex": 202,
    "sched_setaffinity": 203,
    "sched_getaffinity": 204,
    "getdents64": 217,
    "set_tid_address": 218,
    "restart_syscall": 219,
    "timer_create": 222,
    "timer_settime": 223,
    "timer_gettime": 224,
    "timer_getoverrun": 225,
    "timer_delete": 226,
    "clock_gettime": 228,
    "clock_nanosleep": 230,
    "exit_group": 231,
    "epoll_wait": 232,
    "epoll_ctl": 233,
    "tgkill": 234,
    "set_mempolicy": 238,
    "get_mempolicy": 239,
    "inotify_add_watch": 254,
    "inotify_rm_watch": 255,
    "openat": 257,
    "mkdirat": 258,
    "fchownat": 260,
    "unlinkat": 263,
    "readlinkat": 267,
    "fchmodat": 268,
    "ppoll": 271,
    "set_robust_list": 273,
    "get_robust_list": 274,
    "tee": 276,
    "timerfd_create": 283,
    "timerfd_settime": 286,
    "timerfd_gettime": 287,
    "signalfd4": 289,
    "eventfd2": 290,
    "epoll_create1": 291,
    "dup3": 292,
    "pipe2": 293,
    "inotify_init1": 294,
    "preadv": 295,
    "rt_tgsigqueueinfo": 297,
    "prlimit64": 302,
    "name_to_handle_at": 303,
    "open_by_handle_at": 304,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "kcmp": 312,
    "seccomp": 317,
    "getrandom": 318,
    "memfd_create": 319,
    "userfaultfd": 323,
    "membarrier": 324,
    "mlock2": 325,
    "pkey_mprotect": 329,
    "pkey_alloc": 330,
    "pkey_free": 331,
    "rseq": 334,
    "pidfd_send_signal": 424,
    "pidfd_open": 434,
    "clone3": 435,
    "close_range": 436,
    "openat2": 437,
    "pidfd_getfd": 438,
    "process_madvise": 440,
}

NAMES = {nr: name for name, nr in NR.items()}

# ---- wait, signals, clone (linux/wait.h, linux/sched.h) ----------------------

WALL = 0x40000000                    # __WALL: wait for threads and clones too
SIGINFO_SIZE = 128                   # sizeof(siginfo_t)
WNOHANG = 1
PIDFD_THREAD = 0o200                 # pidfd_open: a pidfd for one thread (= O_EXCL; Linux 6.9)
SIGRTMIN_KERNEL, NSIG = 32, 64       # the kernel's first real-time signal (glibc keeps 32-33) and _NSIG
SIG_SETMASK = 2                      # rt_sigprocmask how (asm-generic/signal-defs.h)
CLONE_VM, CLONE_FS, CLONE_FILES, CLONE_SIGHAND = 0x100, 0x200, 0x400, 0x800
CLONE_THREAD, CLONE_SYSVSEM = 0x10000, 0x40000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000

PF_KTHREAD = 0x00200000               # task flag (linux/sched.h), field 9 of /proc/PID/stat: a kernel thread
PF_EXITING = 0x00000004               # task flag: the task is in do_exit (its memory may be gone already)

# Kernel-internal restart codes a stopped task's rax may hold (linux/errno.h).
ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = 512, 513, 514, 516

# ---- files (asm-generic/fcntl.h) ---------------------------------------------

O_ACCMODE, O_RDONLY, O_WRONLY, O_RDWR = 3, 0, 1, 2
O_CREAT, O_EXCL, O_TRUNC, O_NONBLOCK = 0o100, 0o200, 0o1000, 0o4000
O_LARGEFILE = 0o100000               # the kernel's value (glibc's os.O_LARGEFILE is 0 on 64-bit)
O_CLOEXEC = 0o2000000
O_PATH = 0o10000000
O_NOCTTY, O_APPEND, O_DIRECTORY, O_NOFOLLOW = 0o400, 0o2000, 0o200000, 0o400000
O_TMPFILE = 0o20000000 | O_DIRECTORY  # __O_TMPFILE | O_DIRECTORY
AT_FDCWD = -100
F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL, FD_CLOEXEC = 0, 1, 2, 3, 4, 1
F_DUPFD_CLOEXEC = 1030
F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032
SEEK_SET = 0
F_GETLK, F_SETLK = 5, 6
F_OFD_GETLK, F_OFD_SETLK = 36, 37
F_RDLCK, F_WRLCK, F_UNLCK = 0, 1, 2
LOCK_SH, LOCK_EX, LOCK_NB, LOCK_UN = 1, 2, 4, 8
SPLICE_F_NONBLOCK = 2
MFD_CLOEXEC, MFD_ALLOW_SEALING = 1, 2
F_ADD_SEALS, F_GET_SEALS = 1033, 1034
#: F_SEAL_* bits (linux/fcntl.h): SEAL, SHRINK, GROW, WRITE, FUTURE_WRITE, EXEC
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE, F_SEAL_FUTURE_WRITE, F_SEAL_EXEC = 1, 2, 4, 8, 0x10, 0x20
F_SEALS_ALL = 0x3F
RLIMIT_NOFILE = 7
RLIM_INFINITY = (1 << 64) - 1

# ---- arch_prctl (asm/prctl.h) ---------------------------------------------------

ARCH_GET_XCOMP_PERM, ARCH_REQ_XCOMP_PERM = 0x1022, 0x1023

# ---- memory (asm-generic/mman*.h) --------------------------------------------

PROT_NONE, PROT_READ, PROT_WRITE, PROT_EXEC = 0, 1, 2, 4
MAP_SHARED, MAP_PRIVATE, MAP_DROPPABLE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x08, 0x10, 0x20
MAP_GROWSDOWN, MAP_NORESERVE, MAP_POPULATE, MAP_FIXED_NOREPLACE = 0x100, 0x4000, 0x8000, 0x100000
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
MADV_DONTNEED = 4
#: VmFlags -> (MADV_* advice, its name): the madvise state smaps shows and a restore applies again.
MADVISE_NAMED = {"sr": (2, "MADV_SEQUENTIAL"), "rr": (1, "MADV_RANDOM"), "dc": (10, "MADV_DONTFORK"),
                 "dd": (16, "MADV_DONTDUMP"), "mg": (12, "MADV_MERGEABLE"), "hg": (14, "MADV_HUGEPAGE"),
                 "nh": (15, "MADV_NOHUGEPAGE"), "wf": (18, "MADV_WIPEONFORK")}

# ---- SysV shared memory (linux/ipc.h, linux/shm.h) ---------------------------

IPC_PRIVATE, IPC_CREAT, IPC_EXCL = 0, 0o1000, 0o2000
IPC_RMID, IPC_SET, IPC_STAT = 0, 1, 2
SHM_RDONLY, SHM_EXEC = 0o10000, 0o100000
SHM_DEST = 0o1000                    # in shm_perm.mode: IPC_RMID done, gone at the last detach

# ---- prctl (linux/prctl.h) ---------------------------------------------------

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_SET_NAME = 15
PR_CAPBSET_DROP = 24
PR_SET_MM = 35
PR_SET_MM_MAP, PR_SET_MM_MAP_SIZE = 14, 15
PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37
PR_SET_NO_NEW_PRIVS = 38
PR_GET_TID_ADDRESS = 40
PR_CAP_AMBIENT = 47
CAP_SYS_ADMIN = 21
PR_CAP_AMBIENT_RAISE, PR_CAP_AMBIENT_CLEAR_ALL = 2, 4
PR_SET_VMA, PR_SET_VMA_ANON_NAME = 0x53564D41, 0
PR_TIMER_CREATE_RESTORE_IDS = 77     # Linux 6.17: timer_create takes the ID from *timerid
PR_TIMER_CREATE_RESTORE_IDS_OFF, PR_TIMER_CREATE_RESTORE_IDS_ON, PR_TIMER_CREATE_RESTORE_IDS_GET = 0, 1, 2

# ---- timers (linux/time.h, asm-generic/siginfo.h) ------------------------------

ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF = 0, 1, 2
SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD, SIGEV_THREAD_ID = 0, 1, 2, 4

# ---- seccomp, capabilities, kcmp ---------------------------------------------

SECCOMP_MODE_FILTER = 2              # /proc/PID/status Seccomp: 0 disabled, 1 strict, 2 filter
SECCOMP_SET_MODE_STRICT, SECCOMP_SET_MODE_FILTER = 0, 1
SECCOMP_FILTER_FLAG_TSYNC = 1
LINUX_CAPABILITY_VERSION_3 = 0x20080522
KCMP_FILE, KCMP_VM, KCMP_FILES, KCMP_FS, KCMP_SIGHAND, KCMP_IO, KCMP_SYSVSEM, KCMP_EPOLL_TFD = range(8)

# ---- event fds: epoll, timerfd, inotify ---------------------------------------

EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD = 1, 2, 3
EPOLLERR, EPOLLHUP = 0x008, 0x010
EPOLLEXCLUSIVE, EPOLLWAKEUP, EPOLLONESHOT, EPOLLET = 1 << 28, 1 << 29, 1 << 30, 1 << 31
EPOLL_ANY_EVENT = 0x27DF             # IN PRI OUT ERR HUP RDNORM RDBAND WRNORM WRBAND MSG RDHUP
EPOLL_PRIVATE_BITS = EPOLLEXCLUSIVE | EPOLLWAKEUP | EPOLLONESHOT | EPOLLET   # what a fired one-shot keeps
EPOLL_EVENT_SIZE = 12                # struct epoll_event is packed on x86-64: u32 events, u64 data
TFD_TIMER_ABSTIME, TFD_TIMER_CANCEL_ON_SET = 1, 2
TFD_IOC_SET_TICKS = 0x40085400       # _IOW('T', 0, u64); only with CONFIG_CHECKPOINT_RESTORE
CLOCK_REALTIME, CLOCK_MONOTONIC, CLOCK_BOOTTIME, CLOCK_REALTIME_ALARM, CLOCK_BOOTTIME_ALARM = 0, 1, 7, 8, 9
TIMERFD_CLOCKS = (CLOCK_REALTIME, CLOCK_MONOTONIC, CLOCK_BOOTTIME, CLOCK_REALTIME_ALARM, CLOCK_BOOTTIME_ALARM)
IN_ATTRIB, IN_IGNORED = 0x4, 0x8000
IN_DONT_FOLLOW = 0x01000000
IN_ALL_WATCH_BITS = 0xEF000FFF       # event bits and watch flags a watch's mask may hold
MAX_HANDLE_SZ = 128

# ---- userfaultfd (linux/userfaultfd.h) ---------------------------------------

UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_REGISTER_MODE_WP = 2
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFD_FEATURE_INITIALIZED = 1 << 31   # fdinfo shows it once UFFDIO_API ran (kernel-internal)
UFFD_LINK = "anon_inode:[userfaultfd]"
#: The open flags and features of every userfaultfd pycr makes (its tracker, checked by pycr check and leftovers).
UFFD_PYCR_FLAGS = O_NONBLOCK | O_CLOEXEC
UFFD_PYCR_FEATURES = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED
UFFDIO_REGISTER_MODE_MISSING = 1
UFFD_FEATURE_EVENT_FORK = 1 << 1
UFFD_FEATURE_EVENT_REMAP = 1 << 2
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_FEATURE_EVENT_UNMAP = 1 << 6
#: Lazy restore (post-copy): every event that changes which pages are still to be filled.
UFFD_LAZY_FEATURES = (UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_REMOVE
                      | UFFD_FEATURE_EVENT_UNMAP)

# ---- pagemap (Documentation/admin-guide/mm/pagemap.rst, linux/fs.h) ---------

PM_PRESENT = 1 << 63
PM_SWAPPED = 1 << 62
PM_FILE_OR_SHARED = 1 << 61
PM_SOFT_DIRTY = 1 << 55
PAGEMAP_SCAN = 0xC0606610            # _IOWR('f', 16, struct pm_scan_arg)
PAGE_IS_WPALLOWED = 1
PAGE_IS_WRITTEN = 2
PAGE_IS_FILE = 4
PAGE_IS_PRESENT = 8
PAGE_IS_SWAPPED = 16
PAGE_IS_PFNZERO = 32
PAGE_IS_HUGE = 64
PAGE_IS_SOFT_DIRTY = 128
PM_SCAN_WP_MATCHING = 1
PM_SCAN_CHECK_WPASYNC = 2

# ---- sock_diag (linux/netlink.h, linux/sock_diag.h): unix and inet sockets ---

NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY = 4, 20
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
#: include/net/tcp_states.h (unix sockets use ESTABLISHED, CLOSE and LISTEN too)
TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
              7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING", 12: "NEW_SYN_RECV"}
TCP_ESTABLISHED, TCP_CLOSE, TCP_LISTEN = 1, 7, 10
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33

# ---- unix sockets (linux/unix_diag.h, asm-generic/socket.h) -----------------

UDIAG_SHOW_NAME, UDIAG_SHOW_VFS, UDIAG_SHOW_PEER, UDIAG_SHOW_ICONS = 0x1, 0x2, 0x4, 0x8
UDIAG_SHOW_RQLEN, UDIAG_SHOW_MEMINFO, UDIAG_SHOW_UID = 0x10, 0x20, 0x40
UNIX_DIAG_NAME, UNIX_DIAG_VFS, UNIX_DIAG_PEER, UNIX_DIAG_ICONS = 0, 1, 2, 3
UNIX_DIAG_RQLEN, UNIX_DIAG_MEMINFO, UNIX_DIAG_SHUTDOWN, UNIX_DIAG_UID = 4, 5, 6, 7
SO_PASSSEC = 34
SO_PEEK_OFF = 42
SCM_RIGHTS, SCM_CREDENTIALS, SCM_SECURITY = 1, 2, 3

# ---- TCP repair (linux/tcp.h), socket ioctls (linux/sockios.h) --------------

TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ, TCP_REPAIR_OPTIONS = 19, 20, 21, 22
TCP_TIMESTAMP, TCP_REPAIR_WINDOW = 24, 29
TCP_REPAIR_OFF, TCP_REPAIR_ON = 0, 1      # TCP_REPAIR_OFF sends a window probe to the peer
TCP_REPAIR_OFF_NO_WP = -1                # ... this one does not
TCP_NO_QUEUE, TCP_RECV_QUEUE, TCP_SEND_QUEUE = 0, 1, 2
TCPOPT_MAXSEG, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4
SIOCOUTQ, SIOCINQ, SIOCOUTQNSD = 0x5411, 0x541B, 0x894B
# -- classic BPF socket filters (asm-generic/socket.h, linux/filter.h, linux/bpf_common.h)
SO_ATTACH_FILTER, SO_DETACH_FILTER, SO_LOCK_FILTER = 26, 27, 44
SO_GET_FILTER = SO_ATTACH_FILTER      # getsockopt: optlen counts instructions (struct sock_filter, 8 bytes)
BPF_LD_W_IMM = 0x00                   # BPF_LD | BPF_W | BPF_IMM: A = k
BPF_RET_K = 0x06                      # BPF_RET | BPF_K: accept k bytes of the packet, 0 drops it
# -- terminals (asm-generic/ioctls.h; _IOR/_IOW numbers carry the argument size)
TCGETS2 = 0x802C542A                  # _IOR('T', 0x2A, struct termios2)
TCSETS2 = 0x402C542B                  # _IOW('T', 0x2B, struct termios2)
TERMIOS2_SIZE = 44                    # iflag oflag cflag lflag (u32), line (u8), cc[19], ispeed, ospeed (u32)
TIOCGPTN = 0x80045430                 # _IOR('T', 0x30, unsigned int): a pty master's index N (/dev/pts/N)
TIOCSPTLCK = 0x40045431               # _IOW('T', 0x31, int): lock (1) or unlock (0) the slave
TIOCGPKT = 0x80045438                 # _IOR('T', 0x38, int): packet mode
TIOCGPTLCK = 0x80045439               # _IOR('T', 0x39, int)
TIOCGEXCL = 0x80045440                # _IOR('T', 0x40, int)
TIOCEXCL = 0x540C
TIOCSCTTY = 0x540E                     # arg 1: steal it from another session (needs CAP_SYS_ADMIN)
TIOCGPGRP = 0x540F
TIOCSPGRP = 0x5410
TIOCOUTQ = 0x5411
TIOCGWINSZ = 0x5413
TIOCSWINSZ = 0x5414
TIOCPKT = 0x5420
FIONREAD = 0x541B                     # also TIOCINQ
TIOCGSID = 0x5429
TIOCGLCKTRMIOS = 0x5456
