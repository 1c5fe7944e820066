"""``python -m jsample`` and the ``jsample`` console script; see :mod:`jsample.cli`."""

import sys

from jsample.cli import main

if __name__ == "__main__":
    sys.exit(main())
