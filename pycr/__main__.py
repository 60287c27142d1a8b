"""Entry point for `python -m pycr`."""

import sys

from pycr.cli import main

if __name__ == "__main__":
    sys.exit(main())
