"""Everyday programs as test workloads: installed on demand, started on loopback, checkpointed.

A test asks for a program with `need(command, package)`: if the command is
missing, apt installs the package (once per session); if that cannot be done
the test is skipped with one line saying why. `checkpoint(...)` takes a running
tree through `pycr dump` + `pycr restore`, or through `pycr migrate`, and returns
the PID the program now runs as (outside a replica's PID namespace).
"""

import os
import shutil
import socket
import subprocess
import sys

import pytest

from checkpointing import MIGRATED, migrated  # noqa: F401 (MIGRATED: for the tests)
from pycrcmd import pycr

_install_failed = {}


def need(command, package):
    """The path of `command`, installing Debian's `package` if it is missing; else skip the test."""
    path = shutil.which(command)
    if path:
        return path
    if package not in _install_failed:
        if not shutil.which("apt-get"):
            _install_failed[package] = "no apt-get on this machine"
        else:
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            try:
                proc = subprocess.run(["apt-get", "install", "-y", "-q", package], env=env, capture_output=True,
                                      text=True, timeout=600, stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired:
                _install_failed[package] = "apt-get install timed out"
            else:
                if proc.returncode:
                    tail = (proc.stderr.strip().splitlines() or ["failed"])[-1]
                    _install_failed[package] = f"apt-get install {package}: {tail}"
    path = shutil.which(command)
    if not path:
        pytest.skip(f"{command} is not installed and could not be: {_install_failed.get(package, 'not found')}")
    return path


def free_port(family=socket.AF_INET):
    """A TCP port nobody listens on right now (on loopback)."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        return s.getsockname()[1]


def http_site(tmp_path, line):
    """A directory for http.server holding hello.txt: `line` (bytes) 100 times."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "hello.txt").write_bytes(line * 100)
    return site


def start_program(spawn, tmp_path, argv, name=None):
    """Start argv as the root of a workload tree (its own session, output to the log)."""
    wrapper = tmp_path / f"{name or os.path.basename(argv[0])}-exec.py"
    wrapper.write_text(f"#!{sys.executable}\nimport os\nos.execvp({argv[0]!r}, {list(map(str, argv))!r})\n")
    wrapper.chmod(0o755)
    return spawn(str(wrapper), ready=False, status=False)


def connect(port, timeout=10.0, family=socket.AF_INET):
    """A client connection to a server that may still be starting."""
    import time
    deadline = time.monotonic() + timeout
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    while True:
        try:
            return socket.create_connection((host, port), timeout=timeout)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def checkpoint(how, pid, tmp_path, cleanup_pids, *options):
    """Take the tree of pid through `pycr dump` + `pycr restore -d` ("restore") or `pycr migrate`
    ("migrate"); returns the PID its root runs as now, seen from here."""
    if how == "restore":
        images = tmp_path / "img"
        pycr("dump", "-t", pid, "-D", images, *options)
        cleanup_pids.add(pid)
        restore_options = [o for o in options if o != "--tcp-established"]
        pycr("restore", "-D", images, "-d", *restore_options)
        return pid
    return migrated(pid, cleanup_pids, "--max-passes", 3, *options, timeout=300)[0]
