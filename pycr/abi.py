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
    "clock_gettime": 228,
    "clock_nanosleep": 230,
    "exit_group": 231,
    "tgkill": 234,
    "set_mempolicy": 238,
    "get_mempolicy": 239,
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
    "rt_tgsigqueueinfo": 297,
    "prlimit64": 302,
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
CLONE_VM, CLONE_FS, CLONE_FILES, CLONE_SIGHAND = 0x100, 0x200, 0x400, 0x800
CLONE_THREAD, CLONE_SYSVSEM = 0x10000, 0x40000
CLONE_NEWPID = 0x20000000

# Kernel-internal restart codes a stopped task's rax may hold (linux/errno.h).
ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = 512, 513, 514, 516

# ---- files (asm-generic/fcntl.h) ---------------------------------------------

O_ACCMODE, O_RDONLY, O_WRONLY, O_RDWR = 3, 0, 1, 2
O_CREAT, O_EXCL, O_TRUNC, O_NONBLOCK = 0o100, 0o200, 0o1000, 0o4000
O_LARGEFILE = 0o100000               # the kernel's value (glibc's os.O_LARGEFILE is 0 on 64-bit)
O_CLOEXEC = 0o2000000
O_PATH = 0o10000000
AT_FDCWD = -100
F_SETFD, FD_CLOEXEC = 2, 1
F_DUPFD_CLOEXEC = 1030
F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032
SEEK_SET = 0
SPLICE_F_NONBLOCK = 2
MFD_CLOEXEC = 1
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
PR_CAP_AMBIENT_RAISE, PR_CAP_AMBIENT_CLEAR_ALL = 2, 4
PR_SET_VMA, PR_SET_VMA_ANON_NAME = 0x53564D41, 0

# ---- seccomp, capabilities, kcmp ---------------------------------------------

SECCOMP_MODE_FILTER = 2              # /proc/PID/status Seccomp: 0 disabled, 1 strict, 2 filter
SECCOMP_SET_MODE_STRICT, SECCOMP_SET_MODE_FILTER = 0, 1
SECCOMP_FILTER_FLAG_TSYNC = 1
LINUX_CAPABILITY_VERSION_3 = 0x20080522
KCMP_FILE, KCMP_VM, KCMP_FILES, KCMP_FS, KCMP_SIGHAND, KCMP_IO, KCMP_SYSVSEM = range(7)

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
TIOCSCTTY = 0x540E
TIOCGPGRP = 0x540F
TIOCSPGRP = 0x5410
TIOCOUTQ = 0x5411
TIOCGWINSZ = 0x5413
TIOCSWINSZ = 0x5414
TIOCPKT = 0x5420
FIONREAD = 0x541B                     # also TIOCINQ
TIOCGSID = 0x5429
TIOCGLCKTRMIOS = 0x5456
