"""The restorer: brings a dumped tree back with its PIDs, memory, files and registers.

Modules, one job each: load (images, checked), preflight (the system), tasks
(the stub tree), mm and memory (address spaces), files, process (per-process
state), threads (threads and CPU state), pidns, restorer (orchestration).
"""

__all__ = ["restore"]


def __getattr__(name):
    """`pycr.restore.restore` loads the restorer on first use: a dump that needs one small
    module of this package (pipe_ends) does not pay for importing all of it."""
    if name == "restore":
        from pycr.restore.restorer import restore
        return restore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
