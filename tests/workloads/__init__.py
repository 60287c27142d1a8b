"""The C test workloads and their build.

Each workload is one C file here (sharing wl.h); `build(outdir)` compiles them
all with gcc -O2 -g (default PIE) in parallel and returns name -> binary path.
Run as a script to build by hand: python -m workloads OUTDIR (from tests/).
"""

import os
import subprocess

SOURCE_DIR = os.path.dirname(os.path.abspath(__file__))
NAMES = ("counter", "tree", "threads", "bigmem", "openfile", "pipe", "seccomp",
         "forker", "mapper", "execer")
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
