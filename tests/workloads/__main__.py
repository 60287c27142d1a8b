"""python -m workloads OUTDIR (run from tests/): build every workload into OUTDIR."""

import sys

from . import build

if __name__ == "__main__":
    for name, path in build(sys.argv[1] if len(sys.argv) > 1 else "workloads-bin").items():
        print(name, path)
