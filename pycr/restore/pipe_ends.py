"""Pipes of a tree with only one end in it: which end is missing, and what the other meets.

Shared by the dump (which warns while the user can still act) and the restore's
preflight; it imports nothing of the restorer, so a dump does not load it.
"""


#: what a pipe's remaining end meets once its other end is gone (pipe(7))
PIPE_OUTLOOK = {"reader": "its writer gets SIGPIPE at its next write (which kills it unless SIGPIPE is "
                          "ignored or handled: then EPIPE)",
                "writer": "its reader gets EOF once the pipe is drained"}


def lonely_pipe_ends(fds):
    """{pipe_id: "reader" or "writer"}: the end missing from pipes of which fds (type, flags,
    pipe_id of every fd of the tree) hold only the other end."""
    ends = {}
    for kind, flags, pipe_id in fds:
        if kind == "pipe":
            mode = flags & 3
            ends.setdefault(pipe_id, set()).add("w" if mode == 1 else "r" if mode == 0 else "rw")
    return {pipe_id: "reader" if modes == {"w"} else "writer"
            for pipe_id, modes in ends.items() if "rw" not in modes and len(modes) == 1}
