"""The restorer: brings a dumped tree back with its PIDs, memory, files and registers.

Modules, one job each: load (images, checked), preflight (the system), tasks
(the stub tree), mm and memory (address spaces), files, process (per-process
state), threads (threads and CPU state), pidns, restorer (orchestration).
"""

from pycr.restore.restorer import restore

__all__ = ["restore"]
