"""The start the Python workload scripts share: how they report to the test, and how they wait for
its SIGUSR1 (a script may install its own SIGUSR1 handler instead) or write a new generation at its
SIGUSR2. A script is WORKLOAD_PRELUDE + its own text;
"{python}" is the only brace in it, so it suits spawn_python's str.format and a plain replace alike."""

WORKLOAD_PRELUDE = r"""#!{python}
import os, signal, sys, time
st = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
def report(line):
    os.write(st, (line + "\n").encode())
go = []
signal.signal(signal.SIGUSR1, lambda *a: go.append(1))
def wait_for_sigusr1():
    while not go:
        time.sleep(0.01)
    go.pop()
def generations(write):
    # write(1) now, write(n + 1) at each SIGUSR2; "gen N" reported after each.
    gen = [0]
    def next_gen(*a):
        gen[0] += 1
        write(gen[0])
        report("gen %d" % gen[0])
    next_gen()
    signal.signal(signal.SIGUSR2, next_gen)
"""

# For a script with a file open as `fd` and mapped shared as `m` (and FD_GEN_AT set): each generation
# writes "map N" at the mapping's start and "fd N" at FD_GEN_AT through the fd; write_both_ways() then
# writes through each, for the script to report what the other one sees.
MAP_AND_FD_WRITES = r"""def write_gen(n):
    m[0:8] = b"map %04d" % n
    os.pwrite(fd, b"fd %04d" % n, FD_GEN_AT)
def write_both_ways():
    m[8192:8199] = b"via-map"
    os.pwrite(fd, b"via-fd", 8300)
"""

# A child forked at once that only sleeps (`child` is its PID in the parent): a tree of two processes.
SLEEPING_CHILD = r"""child = os.fork()
if child == 0:
    while True:
        time.sleep(0.1)
"""
