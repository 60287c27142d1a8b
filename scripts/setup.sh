#!/usr/bin/env bash
# Set pycr up on a fresh machine (root, Python 3.11, gcc, apt): system packages
# only if something is missing, a venv .venv in the repo, and a regular install
# of this checkout with its test extras. Used by demo.sh and test.sh.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
python="${PYTHON:-python3}"

have_python_headers() {
    "$python" -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'
}

missing=()
command -v gcc >/dev/null || missing+=(gcc libc6-dev)
"$python" -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
have_python_headers || missing+=(python3-dev)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "== installing system packages: ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

if [ ! -x "$venv/bin/python" ]; then
    echo "== creating $venv"
    "$python" -m venv "$venv"
fi

echo "== installing pycr into $venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# The version number does not change between commits: pycr is taken out first
# so that the install builds the tree as it is now (one meson build, not two).
"$venv/bin/python" -m pip uninstall -q -y pycr 2>/dev/null || true
"$venv/bin/python" -m pip install -q "$repo[test]"
