#!/usr/bin/env bash
# Set up a test environment on a fresh machine (root, Python 3.11, gcc, apt)
# and run the whole suite against the *installed* package.
#
# A venv .venv in the repo gets a regular (non-editable) install of
# '.[test]'; pytest then runs from a scratch directory so the source tree
# cannot shadow the installed package (a test checks this).
# Extra arguments go to pytest, e.g. scripts/test.sh -k native -x
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
python="${PYTHON:-python3}"

have_python_headers() {
    "$python" -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'
}

# System packages only when something is missing (Debian/Ubuntu names).
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
# --force-reinstall of pycr alone: the version number does not change between
# commits, and the suite must run against the tree as it is now.
"$venv/bin/python" -m pip install -q "$repo[test]"
"$venv/bin/python" -m pip install -q --force-reinstall --no-deps "$repo"

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
cd "$scratch"
"$venv/bin/python" -c 'import pycr, pycr.native, pycr.formats; print("== pycr from", pycr.__path__[0])'

export PYCR_EXPECT_INSTALLED="$venv"
exec "$venv/bin/python" -m pytest -v -ra -p no:cacheprovider \
    --rootdir "$repo" -c "$repo/pyproject.toml" "$@" "$repo/tests"
