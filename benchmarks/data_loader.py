"""Data-loader benchmark; the same as ``uniter-ds bench data`` (code in uniter_ds/bench/data.py).

    python benchmarks/data_loader.py --seconds 5 --workers 0 1 --out benchmarks/results/data_loader.json
"""

import sys

from uniter_ds.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "data", *sys.argv[1:]]))
