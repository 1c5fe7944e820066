"""Runs the benchmark grid: ``python benchmarks/run.py [--quick] [--device gpu] ...``.

Same as ``python -m jsample bench``; see ``jsample/benchmark.py`` for what each column is.
"""

import sys

from jsample.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
