"""Lazy restore (post-copy, local half): `pycr lazy-pages` serves the pages of a tree that
`pycr restore --lazy-pages` starts without its anonymous private memory.

- protocol.py   the unix socket between the two: JSON messages, userfaultfds by SCM_RIGHTS
- source.py     where pages come from (PageSource; today the local pages files)
- watchdog.py   a helper that kills the tree if the daemon dies before every page is placed
- daemon.py     `pycr lazy-pages`: accept one restore, serve its faults (native FaultServer), report
The restore's half is pycr/restore/lazy.py.
"""
