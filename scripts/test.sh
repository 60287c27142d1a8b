#!/usr/bin/env bash
# Set up a test environment on a fresh machine (root, Python 3.11, gcc, apt)
# and run the whole suite against the *installed* package.
#
# scripts/setup.sh puts a regular (non-editable) install of '.[test]'
# into .venv; pytest then runs from a scratch directory so the source tree
# cannot shadow the installed package (a test checks this).
# Extra arguments go to pytest, e.g. scripts/test.sh -k native -x
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
bash "$repo/scripts/setup.sh"

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
cd "$scratch"
"$venv/bin/python" -c 'import pycr, pycr.native, pycr.formats; print("== pycr from", pycr.__path__[0])'

export PYCR_EXPECT_INSTALLED="$venv"
# Under scripts/reaper.py, a subreaper: the killed restored trees' PIDs are free at once,
# not at init's next reaping round (every second or two on some machines).
exec "$venv/bin/python" "$repo/scripts/reaper.py" "$venv/bin/python" -m pytest -v -ra --durations=30 -p no:cacheprovider \
    --rootdir "$repo" -c "$repo/pyproject.toml" "$@" "$repo/tests"
