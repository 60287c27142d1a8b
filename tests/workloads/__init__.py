"""The C test workloads and their build.

Each workload is one C file here (sharing wl.h); `build(outdir)` compiles them
all with gcc -O2 -g (default PIE) in parallel and returns name -> binary path.
Run as a script to build by hand: python -m workloads OUTDIR (from tests/).

Command lines start with the status argument (a path, "-" or "fd:N"); every
workload reports "ready <pid>" once set up. Reports (one line per write(2)):
  counter [STEP_MS] [clock] count N [MS]; usr1 N (SIGUSR1 handler)
  tree                     proc <pid> <ppid> <pgid>; count <pid> N (4 processes)
  threads                  thread <tid>; count <tid> N (4 threads)
  bigmem [MIB] [--dirty-pct-per-sec P] [--seed S] [--report-ms MS]
                           region <hexaddr> <bytes>; sum <hex> (SIGUSR1); dirtied N (every MS, default 1000)
  openfile PATH [OFFSET]   fd N; offset N (SIGUSR1); read <hex> (SIGUSR2, 16 bytes)
  pipe [NBYTES]            child <pid>; sent N; got <hex> | gotsum <hex> (SIGUSR1 to the child)
  seccomp                  count N; filtered errno 42; filtered2 errno 43 (SIGUSR1)
  forker                   fork <pid>; exit <pid> <code>; count <pid> N
  mapper [STEP_MS]         step N; regions <hexaddr>:<bytes>,...; sum <hex> (SIGUSR1);
                           paused N / resumed N (SIGUSR2)
  execer [DELAY_MS] [TARGET]  count N; exec <pid>; then TARGET's reports (counter by default)
  zombie [CODE|sig:N ...]  zombie <pid> (children left unreaped); count N; on SIGUSR1:
                           reaped <pid> exited C | signaled S; reaped none <errno>; chld N
  zleader                  the leader pthread_exits, 2 threads go on: count <tid> N;
                           usr1 <tid> (SIGUSR1); SIGUSR2: exit_group(7)
  orphan                   orphan <pid> (a session member re-parented away); count <pid> N
  sharedfd [siblings]      child <pid> (clone CLONE_FILES); count <pid> N; opened <pid> <fd>
                           (SIGUSR1); has <pid> <fd40> <fd41> (SIGUSR2); siblings: two
                           children share a table their parent unshared
  xstate                   has avx512 <0|1> amx <0|1>; check N ok | check N bad <zmm31|tmm0>
                           (zmm31 and AMX tile 0 held across steps)
  sigread restart|norestart  pipe <rfd> <wfd>; reading N; read <n> <hex> | read error <errno>;
                           usr1 (SIGUSR1 handler, SA_RESTART or not, while blocked in read)
  pagewriter MIB PCT       writes W (every s); verified W | bad <page> <word> <W> (SIGUSR1: every
                           page checked against the rule its writes follow)
Sums are procutil.checksum() (crc32 << 32 | adler32 of the bytes).
Multi-process workloads give each process its own O_APPEND status description;
single-process ones write at the descriptor's own offset (not O_APPEND).
"""

import os
import subprocess

SOURCE_DIR = os.path.dirname(os.path.abspath(__file__))
NAMES = ("counter", "tree", "threads", "bigmem", "openfile", "pipe", "seccomp",
         "forker", "mapper", "execer", "joiner", "zombie", "zleader", "orphan", "sharedfd", "xstate", "sigread",
         "pagewriter")
CFLAGS = ("-O2", "-g", "-Wall", "-Wextra", "-Werror", "-std=gnu11")


def build(outdir, names=NAMES):
    """Compile every workload into outdir; raise RuntimeError with gcc's output on failure."""
    os.makedirs(outdir, exist_ok=True)
    jobs = {}
    for name in names:
        src = os.path.join(SOURCE_DIR, name + ".c")
        out = os.path.join(outdir, name)
        cmd = ["gcc", *CFLAGS, "-I", SOURCE_DIR, "-o", out, src, "-pthread"]
        jobs[name] = (out, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    errors = []
    for name, (out, proc) in jobs.items():
        text, _ = proc.communicate()
        if proc.returncode != 0:
            errors.append(f"{name}: gcc exited {proc.returncode}\n{text.decode(errors='replace')}")
    if errors:
        raise RuntimeError("building the test workloads failed:\n" + "\n".join(errors))
    return {name: out for name, (out, _) in jobs.items()}
